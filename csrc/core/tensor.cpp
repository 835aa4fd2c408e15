#include "core/tensor.h"

#include <algorithm>
#include <sstream>
#include <utility>

#include "core/errors.h"

namespace llmk {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f64: return "float64";
    case DType::i64: return "int64";
    case DType::i32: return "int32";
    case DType::i16: return "int16";
    case DType::i8: return "int8";
    case DType::u8: return "uint8";
    case DType::boolean: return "bool";
    default: return "an unsupported dtype";
  }
}

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f64: case DType::i64: return 8;
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: case DType::i16: return 2;
    case DType::i8: case DType::u8: case DType::boolean: return 1;
    default: return 0;
  }
}

const char* device_type_name(DeviceType device) {
  switch (device) {
    case DeviceType::cpu: return "cpu";
    case DeviceType::cuda: return "cuda";
    default: return "an unsupported device";
  }
}

static DType dtype_from_dlpack(DLDataType t) {
  if (t.lanes != 1) return DType::other;
  switch (t.code) {
    case kDLFloat:
      return t.bits == 32 ? DType::f32 : t.bits == 16 ? DType::f16 : t.bits == 64 ? DType::f64 : DType::other;
    case kDLBfloat: return t.bits == 16 ? DType::bf16 : DType::other;
    case kDLInt:
      return t.bits == 64 ? DType::i64 : t.bits == 32 ? DType::i32 : t.bits == 16 ? DType::i16
           : t.bits == 8 ? DType::i8 : DType::other;
    case kDLUInt: return t.bits == 8 ? DType::u8 : DType::other;
    case kDLBool: return DType::boolean;
    default: return DType::other;
  }
}

TensorView view_from_dlpack(const DLManagedTensor* managed, std::string name) {
  LLMK_CHECK(managed != nullptr, ValueError, name, ": null DLPack tensor");
  const DLTensor& t = managed->dl_tensor;
  TensorView v;
  v.name = std::move(name);
  LLMK_CHECK(t.ndim >= 0 && t.ndim <= TensorView::kMaxDims, ValueError, v.name, " must have at most ",
             TensorView::kMaxDims, " dimensions, got ", t.ndim);
  v.ndim = t.ndim;
  v.ptr = static_cast<char*>(t.data) + t.byte_offset;
  v.dtype = dtype_from_dlpack(t.dtype);
  v.device = t.device.device_type == kDLCPU ? DeviceType::cpu
           : t.device.device_type == kDLCUDA ? DeviceType::cuda : DeviceType::other;
  v.device_index = t.device.device_id;
  int64_t expected_stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    v.shape[d] = t.shape[d];
    v.strides[d] = t.strides ? t.strides[d] : expected_stride;
    expected_stride *= t.shape[d];
  }
  LLMK_CHECK(v.device != DeviceType::other, DeviceError, v.name,
             " must be on a CPU or CUDA device, got DLPack device type ", t.device.device_type);
  return v;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // strides of an empty tensor are meaningless (torch gives (3, 3, 1) for (2, 0, 3))
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

static std::string join(const int64_t* values, int n) {
  std::ostringstream out;
  out << "(";
  for (int d = 0; d < n; ++d) out << (d ? ", " : "") << values[d];
  out << (n == 1 ? ",)" : ")");
  return out.str();
}

bool TensorView::is_dense() const {
  if (numel() == 0) return true;
  // Sorted by stride, the dimensions (size-1 ones carry no information) must tile memory exactly:
  // each stride is the product of the sizes of the dimensions with smaller strides.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int d = 0; d < ndim; ++d)
    if (shape[d] != 1) dims.emplace_back(strides[d], shape[d]);
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

std::string TensorView::shape_str() const { return join(shape, ndim); }
std::string TensorView::strides_str() const { return join(strides, ndim); }

std::string TensorView::device_str() const {
  return device == DeviceType::cuda ? "cuda:" + std::to_string(device_index) : device_type_name(device);
}

void TensorView::check_contiguous() const {
  LLMK_CHECK(is_contiguous(), ValueError, name, " must be contiguous; got shape ", shape_str(),
             " with strides ", strides_str());
}

void TensorView::check_rows_aligned() const {
  bool aligned = reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (ndim == 0 || shape[ndim - 1] <= 1 || strides[ndim - 1] == 1);
  for (int i = 0; i + 1 < ndim; ++i) aligned = aligned && (shape[i] <= 1 || strides[i] * dtype_size(dtype) % 16 == 0);
  LLMK_CHECK(aligned, ValueError, name, " must start at a 16-byte boundary with unit stride along its last dimension "
             "and other strides that are multiples of 16 bytes, for the CUDA kernels; got shape ", shape_str(),
             ", strides ", strides_str(), " at address ", ptr);
}

void TensorView::check_aligned(int bytes) const {
  const uintptr_t past = reinterpret_cast<uintptr_t>(ptr) % uintptr_t(bytes);
  LLMK_CHECK(past == 0, ValueError, name, "'s data pointer must be ", bytes, "-byte aligned (the kernel copies ", bytes,
             "-byte vectors); got address ", ptr, " (", past, " bytes past a ", bytes,
             "-byte boundary): pass a fresh tensor or a slice starting on an aligned element");
}

void TensorView::check_dense() const {
  LLMK_CHECK(is_dense(), ValueError, name, " must be dense and non-overlapping (contiguous in some "
             "dimension order, e.g. row-major or channels_last); got shape ", shape_str(),
             " with strides ", strides_str());
}

void TensorView::check_ndim(int expected) const {
  LLMK_CHECK(ndim == expected, ValueError, name, " must have ", expected, " dimension",
             expected == 1 ? "" : "s", "; got shape ", shape_str());
}

void TensorView::check_shape(std::initializer_list<int64_t> expected) const {
  bool matches = int(expected.size()) == ndim;
  std::ostringstream wanted;
  wanted << "(";
  int d = 0;
  for (int64_t size : expected) {
    if (matches && size != -1 && size != shape[d]) matches = false;
    wanted << (d ? ", " : "");
    if (size == -1) wanted << "*"; else wanted << size;
    ++d;
  }
  wanted << (expected.size() == 1 ? ",)" : ")");
  LLMK_CHECK(matches, ValueError, name, " must have shape ", wanted.str(), "; got ", shape_str());
}

void TensorView::check_numel(int64_t expected) const {
  LLMK_CHECK(numel() == expected, ValueError, name, " must hold ", expected, " element",
             expected == 1 ? "" : "s", "; got shape ", shape_str());
}

void TensorView::check_floating() const {
  LLMK_CHECK(dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16, TypeError, name,
             " must be float32, float16 or bfloat16; got ", dtype_name(dtype));
}

void TensorView::check_dtype(DType expected) const {
  LLMK_CHECK(dtype == expected, TypeError, name, " must be ", dtype_name(expected), "; got ",
             dtype_name(dtype));
}

void TensorView::check_same_dtype(const TensorView& other) const {
  LLMK_CHECK(dtype == other.dtype, TypeError, name, " is ", dtype_name(dtype), " but ", other.name,
             " is ", dtype_name(other.dtype), "; they must have the same dtype");
}

void TensorView::check_same_device(const TensorView& other) const {
  LLMK_CHECK(device == other.device && device_index == other.device_index, DeviceError, name,
             " is on ", device_str(), " but ", other.name, " is on ", other.device_str(),
             "; all tensors must be on one device");
}

namespace {

struct ByteRange { uintptr_t begin, end; const TensorView* view; };

// The bytes of a dense view (checked), or nothing for an empty one.
bool byte_range(const TensorView& view, ByteRange& range) {
  view.check_dense();  // its bytes are then exactly [ptr, ptr + nbytes)
  const auto begin = reinterpret_cast<uintptr_t>(view.ptr);
  range = ByteRange{begin, begin + uintptr_t(view.nbytes()), &view};
  return range.end > range.begin;
}

}  // namespace

void check_no_overlap(const std::vector<TensorView>& written, const std::vector<TensorView>& read) {
  std::vector<ByteRange> ranges;  // of `written`, sorted by start: disjoint once checked
  ByteRange range;
  for (const TensorView& view : written)
    if (byte_range(view, range)) ranges.push_back(range);
  std::sort(ranges.begin(), ranges.end(), [](const ByteRange& a, const ByteRange& b) { return a.begin < b.begin; });
  for (size_t r = 1; r < ranges.size(); ++r)
    LLMK_CHECK(ranges[r].begin >= ranges[r - 1].end, ValueError, ranges[r].view->name, " overlaps ",
               ranges[r - 1].view->name, " in memory; each tensor must have its own memory");
  for (const TensorView& view : read) {
    if (!byte_range(view, range)) continue;
    // The only written range that can overlap it: the last one starting before it ends.
    auto after = std::upper_bound(ranges.begin(), ranges.end(), range.end - 1,
                                  [](uintptr_t byte, const ByteRange& r) { return byte < r.begin; });
    if (after == ranges.begin()) continue;
    const ByteRange& candidate = *(after - 1);
    LLMK_CHECK(candidate.end <= range.begin, ValueError, view.name, " overlaps ", candidate.view->name,
               " in memory; it is read while ", candidate.view->name, " is written");
  }
}

}  // namespace llmk
