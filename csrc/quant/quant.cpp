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
  LLMK_CHECK(select_backend(codes) == Backend::cpu, DeviceError,
             "int4 pack/unpack run on the CPU kernel only so far: the CUDA kernel (and so the emulated backend) "
             "is not written yet (issue 11)");
}

}  // namespace

void pack_int4(const TensorView& codes, const TensorView& packed, void* stream) {
  check_int4_pair(codes, packed);
  check_no_overlap({packed}, {codes});
  const uint8_t* c = codes.data<uint8_t>();
  for (int64_t i = 0; i < codes.numel(); ++i)
    LLMK_CHECK(c[i] <= 15, ValueError, codes.name, " must hold 4-bit codes in [0, 15]; got ", int(c[i]),
               " at flat index ", i);
  (void)stream;
  pack_int4_cpu(c, codes.shape[0], codes.shape[1], packed.data<int32_t>());
}

void unpack_int4(const TensorView& packed, const TensorView& codes, void* stream) {
  check_int4_pair(codes, packed);
  check_no_overlap({codes}, {packed});
  (void)stream;
  unpack_int4_cpu(packed.data<int32_t>(), codes.shape[0], codes.shape[1], codes.data<uint8_t>());
}

void int4_linear(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                 int64_t group_size, const TensorView* bias, const TensorView& out, void* stream) {
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
  LLMK_CHECK(k % 8 == 0, ValueError, "x's last dimension (in_features) must be a multiple of 8; got ", k);
  LLMK_CHECK(group_size == -1 || group_size == 32 || group_size == 64 || group_size == 128, ValueError,
             "group_size must be 32, 64, 128 or -1; got ", group_size);
  const int64_t size = group_size == -1 ? k : group_size;
  LLMK_CHECK(k % size == 0, ValueError, "in_features (", k, ") must be a multiple of group_size (", group_size, ")");
  LLMK_CHECK(scales.dtype == DType::bf16 || scales.dtype == DType::f16, TypeError,
             "scales must be bfloat16 or float16; got ", dtype_name(scales.dtype));
  scales.check_contiguous();
  scales.check_same_device(x);
  scales.check_shape({k / size, n});
  zeros.check_dtype(DType::u8);
  zeros.check_contiguous();
  zeros.check_same_device(x);
  zeros.check_shape({k / size, n});
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
  check_no_overlap({out}, read);
  LLMK_CHECK(select_backend(x) == Backend::cpu, DeviceError,
             "int4_linear runs on the CPU kernel only so far: the CUDA kernel (and so the emulated backend) is not "
             "written yet (issue 11)");
  (void)stream;
  Int4Problem p;
  p.x_dtype = x.dtype;
  p.scale_dtype = scales.dtype;
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = size;
  p.x = x.ptr;
  p.ldx = x.strides[0];
  p.packed = packed.data<int32_t>();
  p.scales = scales.ptr;
  p.zeros = zeros.data<uint8_t>();
  p.bias = bias ? bias->data<float>() : nullptr;
  p.out = out.ptr;
  int4_linear_cpu(p);
}

namespace {

// a (M, K) and b (N, K) int8, contiguous, one device, CPU only so far; returns (M, N, K).
Int8Problem int8_problem(const TensorView& a, const TensorView& b) {
  for (const TensorView* t : {&a, &b}) {
    t->check_dtype(DType::i8);
    t->check_ndim(2);
    t->check_contiguous();
    t->check_same_device(a);
  }
  LLMK_CHECK(b.shape[1] == a.shape[1], ValueError, "the weight's in_features must be x's last dimension ",
             a.shape[1], "; got shape ", b.shape_str());
  LLMK_CHECK(a.shape[1] < 133000, ValueError, "in_features must be below 133000 (int32 accumulators); got ",
             a.shape[1]);
  LLMK_CHECK(select_backend(a) == Backend::cpu, DeviceError,
             "int8_linear runs on the CPU kernel only so far: the CUDA kernel (and so the emulated backend) is not "
             "written yet (issue 11)");
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
  (void)stream;
  int8_linear_cpu(p);
}

void int8_linear(const TensorView& a, const TensorView& a_scales, const TensorView& b, const TensorView& b_scales,
                 const TensorView* bias, const TensorView& out, void* stream) {
  Int8Problem p = int8_problem(a, b);
  check_vector(a_scales, p.m, a);
  check_vector(b_scales, p.n, a);
  if (bias) check_vector(*bias, p.n, a);
  out.check_floating();
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
  (void)stream;
  int8_linear_cpu(p);
}

}  // namespace llmk::quant
