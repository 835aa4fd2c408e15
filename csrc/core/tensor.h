// TensorView: a borrowed, non-owning description of a tensor that crossed the boundary through
// DLPack. The caller's framework owns the memory and keeps it alive for the duration of the call.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dlpack_abi.h"

namespace llmk {

enum class DType { f32, f16, bf16, f64, i64, i32, i16, i8, u8, boolean, other };
enum class DeviceType { cpu, cuda, other };

const char* dtype_name(DType dtype);
int dtype_size(DType dtype);  // bytes per element; 0 for `other`
const char* device_type_name(DeviceType device);

struct TensorView {
  static constexpr int kMaxDims = 8;

  void* data = nullptr;  // first element (DLPack's byte_offset already applied)
  DType dtype = DType::other;
  DeviceType device = DeviceType::other;
  int device_index = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  std::string name;                // the argument's name, for error messages

  int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_str() const;
  std::string strides_str() const;
  std::string device_str() const;  // "cpu", "cuda:1"

  // Checks that throw a clear exception naming the argument.
  void check_contiguous() const;                      // ValueError
  void check_floating() const;                        // TypeError unless f32/f16/bf16
  void check_dtype(DType expected) const;             // TypeError
  void check_same_device(const TensorView& other) const;  // RuntimeError
};

// Throws ValueError when two of `views` share memory (their byte ranges overlap): an in-place
// kernel over overlapping tensors would race and update shared elements twice.
void check_no_overlap(const std::vector<TensorView>& views);

// Builds a view of `managed` (not consumed: the capsule's owner still frees it). `name` is the
// argument's name as the user wrote it, e.g. "params[3]".
TensorView view_from_dlpack(const DLManagedTensor* managed, std::string name);

}  // namespace llmk
