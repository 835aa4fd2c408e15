// Quantized GEMM (docs/quant.md; issue 11, in progress): so far the int4 format's pack and unpack
// (common/quant_format.h) and the W4A16 product, CPU kernels only.
#pragma once
#include "core/backend.h"
#include "core/tensor.h"

namespace llmk::quant {

// codes: uint8 (N, K), every code in [0, 15], N and K multiples of 8 -> packed: int32 (N / 8,
// ceil(K / 32), 32) in the layout of quant_format.h (K padded with code 0).
void pack_int4(const TensorView& codes, const TensorView& packed, void* stream);
// The inverse: packed int32 (N / 8, ceil(K / 32), 32) -> codes uint8 (N, K).
void unpack_int4(const TensorView& packed, const TensorView& codes, void* stream);

// W4A16: out (M, N) = x (M, K) · dequantize(packed, scales, zeros)ᵀ (+ bias), fp32 accumulation.
// x fp32/bf16/fp16 with a contiguous last dimension, scales bf16/fp16 (groups, N), zeros uint8
// (groups, N), bias float32 (N) or null, out like x's dtype (M, N) contiguous.
void int4_linear(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                 int64_t group_size, const TensorView* bias, const TensorView& out, void* stream);

struct Int4Problem {
  DType x_dtype = DType::bf16, scale_dtype = DType::bf16;
  int64_t m = 0, n = 0, k = 0, group_size = 0;  // group_size: K for one group per row
  const void* x = nullptr;
  int64_t ldx = 0;
  const int32_t* packed = nullptr;
  const void* scales = nullptr;
  const uint8_t* zeros = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
};
void int4_linear_cpu(const Int4Problem& problem);

// W8A8: accumulators acc (M, N) = a (M, K) int8 · b (N, K) int8ᵀ in int32 (exact: |acc| <= K 127^2,
// K < 133 000). With `out`: out = acc * a_scales[m] * b_scales[n] (+ bias[n]) in float, rounded once to
// out's dtype (fp32, bf16, fp16); without: the int32 accumulators themselves into `accumulators`.
void int8_linear(const TensorView& a, const TensorView& a_scales, const TensorView& b, const TensorView& b_scales,
                 const TensorView* bias, const TensorView& out, void* stream);
void int8_matmul(const TensorView& a, const TensorView& b, const TensorView& accumulators, void* stream);

struct Int8Problem {
  int64_t m = 0, n = 0, k = 0;
  const int8_t* a = nullptr;
  const int8_t* b = nullptr;
  const float* a_scales = nullptr;   // null: write the raw accumulators
  const float* b_scales = nullptr;
  const float* bias = nullptr;
  DType out_dtype = DType::i32;
  void* out = nullptr;
};
void int8_linear_cpu(const Int8Problem& problem);

void pack_int4_cpu(const uint8_t* codes, int64_t n, int64_t k, int32_t* packed);
void unpack_int4_cpu(const int32_t* packed, int64_t n, int64_t k, uint8_t* codes);

}  // namespace llmk::quant
