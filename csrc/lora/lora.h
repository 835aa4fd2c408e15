// LoRA-fused matmul (docs/lora.md; issue 13, in progress): so far one adapter with a 16-bit base
// weight and no dropout, forward and the backward's dx.
//
//   out = x Wᵀ + bias + [scale (x Aᵀ)] Bᵀ
//
// The bracket is the shrink, s (M, r_pad) rounded to x's dtype (the PEFT composition rounds x Aᵀ
// too; here the scale is applied before the rounding); its columns past r are zero. The fused kernel
// is the GEMM core's tiled kernel over [x | s] and [W | B] laid end to end along k (ConcatTileLoader):
// the expand is rank_tiles(r) more k tiles of the base GEMM, the bias its epilogue, one rounding.
#pragma once
#include <cstdint>

#include "common/philox.h"
#include "core/backend.h"
#include "core/tensor.h"
#include "gemm/gemm.h"

namespace llmk::lora {

// k elements are laid out in 64s (a multiple of every tiling's bk): the base's K and the rank each
// rounded up to it.
constexpr int64_t kSegment = 64;
LLMK_HD int64_t padded(int64_t v) { return (v + kSegment - 1) / kSegment * kSegment; }

// x (M, K) bf16/fp16 (fp32 on the CPU kernel) with a contiguous last dimension; weight (N, K), lora_a
// (r, K), lora_b (N, r) of x's dtype, contiguous; N and K multiples of 8, r a multiple of 8 (the Python
// layer pads A and B), 8 <= r <= 256; bias float32 (N) or null; shrink: x's dtype (M, padded(r)),
// written (scale x Aᵀ, for a backward); out (M, N) x's dtype; workspace float32 with at least
// lora_workspace(M, N, K, r) elements (the CUDA kernel's split-K at small M).
//
// transposed (the backward's dx): x is dy (M, N), out (M, K) = dy W + [scale (dy B)] A, shrink = scale
// dy B; the same two kernels with every weight read k-major (as stored), bias null.
// x_lora (optional, like x): the shrink's input instead of x (dropout(x), computed by `dropout`).
void lora_linear(const TensorView& x, const TensorView* x_lora, const TensorView& weight, const TensorView& lora_a,
                 const TensorView& lora_b, double scale, const TensorView* bias, bool transposed,
                 const TensorView& shrink, const TensorView& out, const TensorView& workspace, void* stream);

inline int64_t lora_workspace(int64_t m, int64_t n_out, int64_t k_in, int64_t r) {
  return gemm::split_k_workspace(m, n_out, padded(k_in) + padded(r));
}

// In the kernels' terms: in_features = x's columns (K, or N transposed), out_features = out's (N, or K).
struct Problem {
  DType dtype = DType::bf16;
  int64_t m = 0, in_features = 0, out_features = 0, rank = 0, ldx = 0, ld_lora = 0;
  bool transposed = false;
  float scale = 1.0f;
  const void* x = nullptr;
  const void* x_lora = nullptr;   // the shrink's input (x itself without dropout)
  const void* weight = nullptr;
  const void* lora_a = nullptr;
  const void* lora_b = nullptr;
  const float* bias = nullptr;
  void* shrink = nullptr;
  void* out = nullptr;
  float* workspace = nullptr;
};
// dropout: out = x * keep / (1 - p) elementwise, x (M, K) (any row stride, contiguous rows), out (M, K)
// contiguous of x's dtype; element (m, k), i = m K + k, is kept iff word (i mod 4) of
// Philox4x32-10(counter (i div 4 low, high, kDropoutStream, 0), key (seed low, high)) >= threshold
// (llmkernels.reference.lora.dropout_keep; threshold = min(floor(p 2^32), 2^32 - 1) computed in double
// by the caller, keep_scale = 1 / (1 - p)); the product is in float32, rounded once.
void dropout(const TensorView& x, uint64_t seed, uint32_t threshold, double keep_scale, const TensorView& out,
             void* stream);

constexpr uint32_t kDropoutStream = 0x4C6F5241u;   // "LoRA"

struct DropoutProblem {
  DType dtype = DType::bf16;
  int64_t m = 0, k = 0, ldx = 0;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  float keep_scale = 1.0f;
  const void* x = nullptr;
  void* out = nullptr;
};
void dropout_cpu(const DropoutProblem& problem);
void dropout_device(const DropoutProblem& problem, CudaStream stream);
void dropout_device(const DropoutProblem& problem, EmuStream stream);

// The four words of group g (indices 4g .. 4g + 3) of the dropout stream.
LLMK_HD Philox4 dropout_words(uint64_t seed, uint64_t group) {
  return philox4x32_10(Philox4{{uint32_t(group), uint32_t(group >> 32), kDropoutStream, 0u}}, uint32_t(seed),
                       uint32_t(seed >> 32));
}

void lora_linear_cpu(const Problem& problem);
void lora_linear_device(const Problem& problem, CudaStream stream);
void lora_linear_device(const Problem& problem, EmuStream stream);

}  // namespace llmk::lora
