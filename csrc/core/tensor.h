// TensorView: a borrowed, non-owning description of a tensor that crossed the boundary through
// DLPack. The caller's framework owns the memory and keeps it alive for the duration of the call.
//
// The checks every family repeats live here, each throwing a clear exception that names the
// argument: ValueError for shapes and layouts, TypeError for dtypes, RuntimeError for devices.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/float_types.h"
#include "core/dlpack_abi.h"
#include "core/errors.h"

namespace llmk {

enum class DType { f32, f16, bf16, f64, i64, i32, i16, i8, u8, boolean, other };
enum class DeviceType { cpu, cuda, other };

const char* dtype_name(DType dtype);
int dtype_size(DType dtype);  // bytes per element; 0 for `other`
const char* device_type_name(DeviceType device);

// The DType of a C++ element type: dtype_of<bf16>() == DType::bf16.
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }
template <> constexpr DType dtype_of<f16>() { return DType::f16; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<int16_t>() { return DType::i16; }
template <> constexpr DType dtype_of<int8_t>() { return DType::i8; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::u8; }

struct TensorView {
  static constexpr int kMaxDims = 8;

  void* ptr = nullptr;  // first element (DLPack's byte_offset already applied)
  DType dtype = DType::other;
  DeviceType device = DeviceType::other;
  int device_index = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  std::string name;                // the argument's name, for error messages

  int64_t numel() const;
  int64_t nbytes() const { return numel() * dtype_size(dtype); }
  bool is_contiguous() const;  // row-major
  // Dense and non-overlapping in some dimension order (row-major, channels_last, any permutation):
  // the elements fill [ptr, ptr + nbytes) exactly once, so an elementwise kernel may treat the
  // tensor as a flat array in memory order.
  bool is_dense() const;
  std::string shape_str() const;
  std::string strides_str() const;
  std::string device_str() const;  // "cpu", "cuda:1"

  // The first element as T*, after checking that T is this view's dtype.
  template <typename T>
  T* data() const {
    LLMK_CHECK(dtype == dtype_of<T>(), TypeError, name, " holds ", dtype_name(dtype), ", read as ",
               dtype_name(dtype_of<T>()));
    return static_cast<T*>(ptr);
  }

  void check_contiguous() const;                               // ValueError
  void check_dense() const;                                    // ValueError
  void check_ndim(int expected) const;                         // ValueError
  // ValueError unless the shape is `expected`; -1 in `expected` matches any size.
  void check_shape(std::initializer_list<int64_t> expected) const;
  void check_numel(int64_t expected) const;                    // ValueError
  void check_floating() const;                                 // TypeError unless f32/f16/bf16
  void check_dtype(DType expected) const;                      // TypeError
  void check_same_dtype(const TensorView& other) const;        // TypeError
  void check_same_device(const TensorView& other) const;       // RuntimeError
  // ValueError unless rows of the last dimension can be copied in 16-byte pieces (what the CUDA
  // kernels' cp.async tiles need): a 16-byte aligned start, unit stride along the last dimension and
  // the other strides multiples of 16 bytes (the Python layers copy a tensor that is not).
  void check_rows_aligned() const;
  // ValueError unless the data pointer is aligned to `bytes` (what the CUDA kernels' vector copies
  // of that size need).
  void check_aligned(int bytes) const;
};

// Throws ValueError when two of `written` share memory (their byte ranges overlap), or when one of
// `read` shares memory with one of `written` (read-only views may share memory with each other): an
// in-place kernel over overlapping tensors would race and update shared elements twice, and a value
// read while other threads write it is not one value. Checks that every view is dense first
// (ValueError otherwise), so that its bytes are [ptr, ptr + nbytes).
void check_no_overlap(const std::vector<TensorView>& written, const std::vector<TensorView>& read = {});

// The dense 1-D view from a view's first to its last element (strides are non-negative): what a
// strided input (a slice of a packed qkv, rows with a stride) occupies, for check_no_overlap.
inline TensorView extent(const TensorView& view) {
  TensorView span = view;
  int64_t last = 0;
  bool empty = false;
  for (int d = 0; d < view.ndim; ++d) {
    empty |= view.shape[d] == 0;
    last += (view.shape[d] - 1) * view.strides[d];
  }
  span.ndim = 1;
  span.shape[0] = empty ? 0 : last + 1;
  span.strides[0] = 1;
  return span;
}

// Builds a view of `managed` (not consumed: the capsule's owner still frees it). `name` is the
// argument's name as the user wrote it, e.g. "params[3]".
TensorView view_from_dlpack(const DLManagedTensor* managed, std::string name);

}  // namespace llmk
