// Quantized GEMM (docs/quant.md; issue 11, in progress): so far the int4 format's pack and unpack
// (common/quant_format.h) and the W4A16 product, CPU kernels only.
#pragma once
#include "core/backend.h"
#include "core/tensor.h"
#include "gemm/gemm.h"

namespace llmk::quant {

// int4 quantization (llmkernels.quant.quantize_int4; quant_format.h: int4_group, int4_code): w (N, K)
// fp32/bf16/fp16 contiguous, N and K multiples of 8, K a multiple of group_size (32, 64, 128, or -1 for
// one group per row) -> packed int32 (N / 8, ceil(K / 32), 32), scales bf16/fp16 (groups, N), zeros
// uint8 (groups, N). The codes never exist unpacked.
// An int4 weight's groups: group_size 32, 64, 128 or -1 (one group of K), K a multiple of it, scales
// bf16/fp16 and zeros uint8, both (groups, N), contiguous, on `like`'s device. Returns the group's size.
// (Shared with LoRA's int4 base.)
int64_t check_int4_groups(int64_t n, int64_t k, int64_t group_size, const TensorView& scales,
                          const TensorView& zeros, const TensorView& like);
void quantize_int4(const TensorView& w, int64_t group_size, bool symmetric, const TensorView& packed,
                   const TensorView& scales, const TensorView& zeros, void* stream);

struct Int4QuantizeProblem {
  DType w_dtype = DType::f32, scale_dtype = DType::bf16;
  int64_t n = 0, k = 0, group_size = 0;   // group_size: K for one group per row
  bool symmetric = false;
  const void* w = nullptr;
  int32_t* packed = nullptr;
  void* scales = nullptr;
  uint8_t* zeros = nullptr;
};
void quantize_int4_cpu(const Int4QuantizeProblem& problem);
void quantize_int4_device(const Int4QuantizeProblem& problem, CudaStream stream);
void quantize_int4_device(const Int4QuantizeProblem& problem, EmuStream stream);

// codes: uint8 (N, K), every code in [0, 15], N and K multiples of 8 -> packed: int32 (N / 8,
// ceil(K / 32), 32) in the layout of quant_format.h (K padded with code 0).
void pack_int4(const TensorView& codes, const TensorView& packed, void* stream);
// The inverse: packed int32 (N / 8, ceil(K / 32), 32) -> codes uint8 (N, K).
void unpack_int4(const TensorView& packed, const TensorView& codes, void* stream);

// W4A16: out (M, N) = x (M, K) · dequantize(packed, scales, zeros)ᵀ (+ bias), fp32 accumulation.
// x fp32/bf16/fp16 with a contiguous last dimension, scales bf16/fp16 (groups, N), zeros uint8
// (groups, N), bias float32 (N) or null, out like x's dtype (M, N) contiguous.
// workspace: float32, at least int4_split_k_workspace(m, n, k) elements for the CUDA kernel (unused by the CPU kernel).
void int4_linear(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView& zeros,
                 int64_t group_size, const TensorView* bias, const TensorView& out,
                 const TensorView& workspace, void* stream);

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
  float* workspace = nullptr;    // int4_split_k_workspace(m, n, k) floats, for the CUDA kernel's split-K
  bool out_f32 = false;          // CPU kernel only: out is float32 (LoRA's int4 base, summed before rounding)
};
void int4_linear_cpu(const Int4Problem& problem);
void int4_linear_device(const Int4Problem& problem, CudaStream stream);
void int4_linear_device(const Int4Problem& problem, EmuStream stream);

// Split-K of the CUDA W4A16 kernel for M <= 16 (quant_cuda.cu's small tiling: 64 columns, k tiles
// of 64): ranges of at least 4 k tiles, aiming at four blocks per H100 SM.
constexpr int64_t kInt4SplitMaxRows = 16, kInt4SplitTileN = 64, kInt4SplitTileK = 64;
inline gemm::SplitK int4_split_k(int64_t m, int64_t n, int64_t k) {
  const int64_t k_tiles = (k + kInt4SplitTileK - 1) / kInt4SplitTileK;
  if (m == 0 || m > kInt4SplitMaxRows) return gemm::SplitK{1, k_tiles};
  return gemm::plan_split_k((n + kInt4SplitTileN - 1) / kInt4SplitTileN, k_tiles, 4 * 132, 4);
}
inline int64_t int4_split_k_workspace(int64_t m, int64_t n, int64_t k) {
  const gemm::SplitK s = int4_split_k(m, n, k);
  return s.splits > 1 ? int64_t(s.splits) * m * n : 0;
}

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
void int8_linear_device(const Int8Problem& problem, CudaStream stream);
void int8_linear_device(const Int8Problem& problem, EmuStream stream);

// W8A16: out (M, N) = (x (M, K) · w (N, K) int8ᵀ) * w_scales[n] (+ bias), x fp32/bf16/fp16 with a
// contiguous last dimension (fp32 on the CPU kernel only), w_scales and bias float32 (N), out like
// x's dtype; workspace as int4_linear's (the CUDA kernel shares W4A16's tilings and split-K).
void int8_weight_linear(const TensorView& x, const TensorView& w, const TensorView& w_scales, const TensorView* bias,
                        const TensorView& out, const TensorView& workspace, void* stream);

struct Int8WeightProblem {
  DType x_dtype = DType::bf16;
  int64_t m = 0, n = 0, k = 0, ldx = 0;
  const void* x = nullptr;
  const int8_t* w = nullptr;
  const float* w_scales = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  float* workspace = nullptr;
};
void int8_weight_linear_cpu(const Int8WeightProblem& problem);
void int8_weight_linear_device(const Int8WeightProblem& problem, CudaStream stream);
void int8_weight_linear_device(const Int8WeightProblem& problem, EmuStream stream);

// Dynamic per-token int8 quantization of activations (W8A8's first kernel): x (M, K) fp32/bf16/fp16
// with a contiguous last dimension, divided by smooth (K,) float32 when given (SmoothQuant), ->
// codes int8 (M, K) contiguous and scales float32 (M,), with quant_format.h's int8_scale/int8_code.
void quantize_per_token(const TensorView& x, const TensorView* smooth, const TensorView& codes,
                        const TensorView& scales, void* stream);

struct TokenQuantProblem {
  DType x_dtype = DType::bf16;
  int64_t m = 0, k = 0, ldx = 0;
  const void* x = nullptr;
  const float* smooth = nullptr;
  int8_t* codes = nullptr;
  float* scales = nullptr;
};
void quantize_per_token_cpu(const TokenQuantProblem& problem);
void quantize_per_token_device(const TokenQuantProblem& problem, CudaStream stream);
void quantize_per_token_device(const TokenQuantProblem& problem, EmuStream stream);

void pack_int4_cpu(const uint8_t* codes, int64_t n, int64_t k, int32_t* packed);
void unpack_int4_cpu(const int32_t* packed, int64_t n, int64_t k, uint8_t* codes);
void pack_int4_device(const uint8_t* codes, int64_t n, int64_t k, int32_t* packed, CudaStream stream);
void pack_int4_device(const uint8_t* codes, int64_t n, int64_t k, int32_t* packed, EmuStream stream);
void unpack_int4_device(const int32_t* packed, int64_t n, int64_t k, uint8_t* codes, CudaStream stream);
void unpack_int4_device(const int32_t* packed, int64_t n, int64_t k, uint8_t* codes, EmuStream stream);

}  // namespace llmk::quant
