// Entry points of the quantized GEMM family (quant.h): every check before any kernel runs.
#include "quant/quant.h"

#include "common/quant_format.h"
#include "core/errors.h"

#include <vector>

namespace llmk::quant {
namespace {

// codes (N, K) uint8 and packed (N / 8, ceil(K / 32), 32) int32, on one device, contiguous.
void check_int4_pair(const TensorView& codes, const TensorView& packed) {
  codes.check_dtype(DType::u8);
  codes.check_ndim(2);
  codes.check_contiguous();
  packed.check_dtype(DType::i32);
  packed.check_contiguous();
  packed.check_same_device(codes);
  const int64_t n = codes.shape[0], k = codes.shape[1];
  LLMK_CHECK(n % 8 == 0 && k % 8 == 0, ValueError, codes.name, " must have N and K multiples of 8; got shape ",
             codes.shape_str());
  packed.check_shape({n / kInt4BlockN, int4_k_blocks(k), 32});
}

// The weight-only products' (W4A16, W8A16) checks of x, out and the split-K workspace once the
// weight's own are done: the output shares memory with nothing it reads (`read`), the workspace
// (float32, at least int4_split_k_workspace(m, n, k) for the CUDA kernels) with nothing at all; on
// the CUDA kernels x is 16-bit (the tensor cores take it as it is) and x and out copy in 16-byte rows.
// Returns the workspace the kernel uses (0: none).
int64_t check_weight_only_io(const TensorView& x, std::vector<TensorView> read, const TensorView& out,
                             const TensorView& workspace, int64_t m, int64_t n, int64_t k) {
  workspace.check_dtype(DType::f32);
  workspace.check_contiguous();
  workspace.check_same_device(x);
  const Backend backend = select_backend(x);
  const int64_t needed = backend == Backend::cpu ? 0 : int4_split_k_workspace(m, n, k);
  LLMK_CHECK(workspace.numel() >= needed, ValueError, workspace.name, " must have at least ", needed,
             " elements (int4_split_k_workspace(m, n, k)); got ", workspace.numel());
  check_no_overlap({out}, read);
  if (needed > 0) {
    read.push_back(out);
    check_no_overlap({workspace}, read);
  }
  if (backend != Backend::cpu) {
    LLMK_CHECK(x.dtype == DType::bf16 || x.dtype == DType::f16, TypeError,
               "x must be bfloat16 or float16 for the CUDA kernel (float32 runs on the CPU kernel only); got ",
               dtype_name(x.dtype), backend == Backend::emu ? " (emulated)" : " on CUDA");
    for (const TensorView* t : {&x, &out}) t->check_rows_aligned();
  }
  return needed;
}

}  // namespace

// An int4 weight's groups: group_size 32, 64, 128 or -1 (one group of K), K a multiple of it, scales
// bf16/fp16 and zeros uint8, both (groups, N), contiguous, on `like`'s device. Returns the group's size.
int64_t check_int4_groups(int64_t n, int64_t k, int64_t group_size, const TensorView& scales,
                          const TensorView& zeros, const TensorView& like) {
  LLMK_CHECK(group_size == -1 || group_size == 32 || group_size == 64 || group_size == 128, ValueError,
             "group_size must be 32, 64, 128 or -1; got ", group_size);
  const int64_t size = group_size == -1 ? k : group_size;
  LLMK_CHECK(k % size == 0, ValueError, "in_features (", k, ") must be a multiple of group_size (", group_size, ")");
  LLMK_CHECK(scales.dtype == DType::bf16 || scales.dtype == DType::f16, TypeError,
             "scales must be bfloat16 or float16; got ", dtype_name(scales.dtype));
  zeros.check_dtype(DType::u8);
  for (const TensorView* t : {&scales, &zeros}) {
    t->check_contiguous();
    t->check_same_device(like);
    t->check_shape({k / size, n});
  }
  return size;
}

void pack_int4(const TensorView& codes, const TensorView& packed, void* stream) {
  check_int4_pair(codes, packed);
  check_no_overlap({packed}, {codes});
  const uint8_t* c = codes.data<uint8_t>();
  const int64_t n = codes.shape[0], k = codes.shape[1];
  int32_t* words = packed.data<int32_t>();
  // (The codes' range is checked here only where they are host memory: on CUDA the Python layer checks
  // it; the kernels keep the low four bits.)
  if (codes.device == DeviceType::cpu)
    for (int64_t i = 0; i < codes.numel(); ++i)
      LLMK_CHECK(c[i] <= 15, ValueError, codes.name, " must hold 4-bit codes in [0, 15]; got ", int(c[i]),
                 " at flat index ", i);
  run_on_backend(codes, stream, Operands().add(codes).add(packed), [&] { pack_int4_cpu(c, n, k, words); },
                 [&](auto device_stream) { pack_int4_device(c, n, k, words, device_stream); });
}

void quantize_int4(const TensorView& w, int64_t group_size, bool symmetric, const TensorView& packed,
                   const TensorView& scales, const TensorView& zeros, void* stream) {
  w.check_ndim(2);
  w.check_floating();
  w.check_contiguous();
  const int64_t n = w.shape[0], k = w.shape[1];
  LLMK_CHECK(n % 8 == 0 && k % 8 == 0 && k > 0, ValueError,
             "w's out_features and in_features must be multiples of 8 (in_features positive); got shape ", w.shape_str());
  packed.check_dtype(DType::i32);
  packed.check_contiguous();
  packed.check_same_device(w);
  packed.check_shape({n / kInt4BlockN, int4_k_blocks(k), 32});
  const int64_t size = check_int4_groups(n, k, group_size, scales, zeros, w);
  check_no_overlap({packed, scales, zeros}, {w});
  Int4QuantizeProblem p;
  p.w_dtype = w.dtype;
  p.scale_dtype = scales.dtype;
  p.n = n;
  p.k = k;
  p.group_size = size;
  p.symmetric = symmetric;
  p.w = w.ptr;
  p.packed = packed.data<int32_t>();
  p.scales = scales.ptr;
  p.zeros = zeros.data<uint8_t>();
  if (n == 0 || k == 0) return;
  run_on_backend(w, stream, Operands().add(w).add(packed).add(scales).add(zeros), [&] { quantize_int4_cpu(p); },
                 [&](auto device_stream) { quantize_int4_device(p, device_stream); });
}

void unpack_int4(const TensorView& packed, const TensorView& codes, void* stream) {
  check_int4_pair(codes, packed);
  check_no_overlap({codes}, {packed});
  const int32_t* words = packed.data<int32_t>();
  uint8_t* c = codes.data<uint8_t>();
  const int64_t n = codes.shape[0], k = codes.shape[1];
  run_on_backend(codes, stream, Operands().add(codes).add(packed), [&] { unpack_int4_cpu(words, n, k, c); },
                 [&](auto device_stream) { unpack_int4_device(words, n, k, c, device_stream); });
}

void int4_linear(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                 int64_t group_size, const TensorView* bias, const TensorView& out,
                 const TensorView& workspace, void* stream) {
  x.check_ndim(2);
  x.check_floating();
  LLMK_CHECK(x.strides[1] == 1, ValueError, "x must have a contiguous last dimension; got strides ", x.strides_str());
  const int64_t m = x.shape[0], k = x.shape[1];
  packed.check_dtype(DType::i32);
  packed.check_ndim(3);
  packed.check_contiguous();
  packed.check_same_device(x);
  const int64_t n = packed.shape[0] * kInt4BlockN;
  packed.check_shape({n / kInt4BlockN, int4_k_blocks(k), 32});
  LLMK_CHECK(k % 8 == 0 && k > 0, ValueError, "x's last dimension (in_features) must be a positive multiple of 8; got ", k);
  const int64_t size = check_int4_groups(n, k, group_size, scales, zeros, x);
  if (bias) {
    bias->check_dtype(DType::f32);
    bias->check_contiguous();
    bias->check_same_device(x);
    bias->check_shape({n});
  }
  out.check_same_dtype(x);
  out.check_same_device(x);
  out.check_contiguous();
  out.check_shape({m, n});
  std::vector<TensorView> read{extent(x), packed, scales, zeros};
  if (bias) read.push_back(*bias);
  const int64_t workspace_needed = check_weight_only_io(x, read, out, workspace, m, n, k);
  const Backend backend = select_backend(x);
  if (backend != Backend::cpu) {
    LLMK_CHECK(scales.dtype == x.dtype, TypeError, "scales must have x's dtype (", dtype_name(x.dtype),
               ") for the CUDA kernel, which dequantizes in it; got ", dtype_name(scales.dtype),
               ": quantize with scale_dtype=x.dtype");
    for (const TensorView* t : {&packed, &scales}) t->check_rows_aligned();
    zeros.check_aligned(8);
  }
  Int4Problem p;
  p.x_dtype = x.dtype;
  p.scale_dtype = scales.dtype;
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = size;
  p.x = x.ptr;
  p.ldx = m <= 1 ? k : x.strides[0];
  p.packed = packed.data<int32_t>();
  p.scales = scales.ptr;
  p.zeros = zeros.data<uint8_t>();
  p.bias = bias ? bias->data<float>() : nullptr;
  p.out = out.ptr;
  p.workspace = workspace_needed > 0 ? workspace.data<float>() : nullptr;
  if (m == 0) return;
  Operands operands;
  operands.add(x).add(packed).add(scales).add(zeros).add(bias).add(out).add(workspace);
  run_on_backend(x, stream, operands, [&] { int4_linear_cpu(p); },
                 [&](auto device_stream) { int4_linear_device(p, device_stream); });
}

namespace {

// a (M, K) and b (N, K) int8, contiguous, one device; returns (M, N, K).
Int8Problem int8_problem(const TensorView& a, const TensorView& b) {
  for (const TensorView* t : {&a, &b}) {
    t->check_dtype(DType::i8);
    t->check_ndim(2);
    t->check_contiguous();
    t->check_same_device(a);
  }
  LLMK_CHECK(b.shape[1] == a.shape[1], ValueError, "the weight's in_features must be x's last dimension ",
             a.shape[1], "; got shape ", b.shape_str());
  LLMK_CHECK(a.shape[1] % 8 == 0 && b.shape[0] % 8 == 0, ValueError,
             "in_features and out_features must be multiples of 8; got x's ", a.shape[1], " and the weight's ",
             b.shape_str());
  LLMK_CHECK(a.shape[1] < 131072, ValueError,
             "in_features must be below 131072 (int32 accumulators of codes down to -128); got ", a.shape[1]);
  // (The CUDA kernel copies rows in 16-byte pieces, or 8-byte ones when K % 16 == 8.)
  if (select_backend(a) != Backend::cpu)
    for (const TensorView* t : {&a, &b}) t->check_aligned(16);
  Int8Problem p;
  p.m = a.shape[0];
  p.n = b.shape[0];
  p.k = a.shape[1];
  p.a = a.data<int8_t>();
  p.b = b.data<int8_t>();
  return p;
}

void check_vector(const TensorView& t, int64_t size, const TensorView& like) {
  t.check_dtype(DType::f32);
  t.check_contiguous();
  t.check_same_device(like);
  t.check_numel(size);
}

}  // namespace

void int8_matmul(const TensorView& a, const TensorView& b, const TensorView& accumulators, void* stream) {
  Int8Problem p = int8_problem(a, b);
  accumulators.check_dtype(DType::i32);
  accumulators.check_contiguous();
  accumulators.check_same_device(a);
  accumulators.check_shape({p.m, p.n});
  check_no_overlap({accumulators}, {a, b});
  p.out = accumulators.ptr;
  if (p.m == 0) return;
  run_on_backend(a, stream, Operands().add(a).add(b).add(accumulators), [&] { int8_linear_cpu(p); },
                 [&](auto device_stream) { int8_linear_device(p, device_stream); });
}

void int8_linear(const TensorView& a, const TensorView& a_scales, const TensorView& b, const TensorView& b_scales,
                 const TensorView* bias, const TensorView& out, void* stream) {
  Int8Problem p = int8_problem(a, b);
  check_vector(a_scales, p.m, a);
  check_vector(b_scales, p.n, a);
  if (bias) check_vector(*bias, p.n, a);
  LLMK_CHECK(out.dtype == DType::f32 || out.dtype == DType::bf16 || out.dtype == DType::f16, TypeError,
             "out must be float32, bfloat16 or float16; got ", dtype_name(out.dtype));
  out.check_contiguous();
  out.check_same_device(a);
  out.check_shape({p.m, p.n});
  std::vector<TensorView> read{a, a_scales, b, b_scales};
  if (bias) read.push_back(*bias);
  check_no_overlap({out}, read);
  p.a_scales = a_scales.data<float>();
  p.b_scales = b_scales.data<float>();
  p.bias = bias ? bias->data<float>() : nullptr;
  p.out_dtype = out.dtype;
  p.out = out.ptr;
  if (p.m == 0) return;
  run_on_backend(a, stream, Operands().add(a).add(a_scales).add(b).add(b_scales).add(bias).add(out),
                 [&] { int8_linear_cpu(p); }, [&](auto device_stream) { int8_linear_device(p, device_stream); });
}

void int8_weight_linear(const TensorView& x, const TensorView& w, const TensorView& w_scales, const TensorView* bias,
                        const TensorView& out, const TensorView& workspace, void* stream) {
  x.check_ndim(2);
  x.check_floating();
  LLMK_CHECK(x.shape[1] <= 1 || x.strides[1] == 1, ValueError, "x must have a contiguous last dimension; got strides ",
             x.strides_str());
  const int64_t m = x.shape[0], k = x.shape[1];
  w.check_dtype(DType::i8);
  w.check_ndim(2);
  w.check_contiguous();
  w.check_same_device(x);
  const int64_t n = w.shape[0];
  LLMK_CHECK(w.shape[1] == k, ValueError, "the weight's in_features must be x's last dimension ", k, "; got shape ",
             w.shape_str());
  LLMK_CHECK(n % 8 == 0 && k % 8 == 0, ValueError, "out_features and in_features must be multiples of 8; got ",
             w.shape_str());
  check_vector(w_scales, n, x);
  if (bias) check_vector(*bias, n, x);
  out.check_same_dtype(x);
  out.check_same_device(x);
  out.check_contiguous();
  out.check_shape({m, n});
  std::vector<TensorView> read{extent(x), w, w_scales};
  if (bias) read.push_back(*bias);
  const int64_t workspace_needed = check_weight_only_io(x, read, out, workspace, m, n, k);
  if (select_backend(x) != Backend::cpu) w.check_aligned(16);
  Int8WeightProblem p;
  p.x_dtype = x.dtype;
  p.m = m;
  p.n = n;
  p.k = k;
  p.ldx = m <= 1 ? k : x.strides[0];
  p.x = x.ptr;
  p.w = w.data<int8_t>();
  p.w_scales = w_scales.data<float>();
  p.bias = bias ? bias->data<float>() : nullptr;
  p.out = out.ptr;
  p.workspace = workspace_needed > 0 ? workspace.data<float>() : nullptr;
  if (m == 0) return;
  run_on_backend(x, stream, Operands().add(x).add(w).add(w_scales).add(bias).add(out).add(workspace),
                 [&] { int8_weight_linear_cpu(p); },
                 [&](auto device_stream) { int8_weight_linear_device(p, device_stream); });
}

void quantize_per_token(const TensorView& x, const TensorView* smooth, const TensorView& codes,
                        const TensorView& scales, void* stream) {
  x.check_ndim(2);
  x.check_floating();
  LLMK_CHECK(x.shape[1] <= 1 || x.strides[1] == 1, ValueError, "x must have a contiguous last dimension; got strides ",
             x.strides_str());
  const int64_t m = x.shape[0], k = x.shape[1];
  if (smooth) {
    smooth->check_dtype(DType::f32);
    smooth->check_contiguous();
    smooth->check_same_device(x);
    smooth->check_shape({k});
  }
  codes.check_dtype(DType::i8);
  codes.check_contiguous();
  codes.check_same_device(x);
  codes.check_shape({m, k});
  scales.check_dtype(DType::f32);
  scales.check_contiguous();
  scales.check_same_device(x);
  scales.check_shape({m});
  std::vector<TensorView> read{extent(x)};
  if (smooth) read.push_back(*smooth);
  check_no_overlap({codes, scales}, read);
  TokenQuantProblem p;
  p.x_dtype = x.dtype;
  p.m = m;
  p.k = k;
  p.ldx = m <= 1 ? k : x.strides[0];
  p.x = x.ptr;
  p.smooth = smooth ? smooth->data<float>() : nullptr;
  p.codes = codes.data<int8_t>();
  p.scales = scales.data<float>();
  if (m == 0) return;
  run_on_backend(x, stream, Operands().add(x).add(smooth).add(codes).add(scales), [&] { quantize_per_token_cpu(p); },
                 [&](auto device_stream) { quantize_per_token_device(p, device_stream); });
}

}  // namespace llmk::quant
