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
#include <vector>

#include "common/philox.h"
#include "core/backend.h"
#include "core/tensor.h"
#include "gemm/gemm.h"

namespace llmk::lora {

// k elements are laid out in 64s (a multiple of every tiling's bk): the base's K and the rank each
// rounded up to it.
constexpr int64_t kSegment = 64;
LLMK_HD int64_t padded(int64_t v) { return (v + kSegment - 1) / kSegment * kSegment; }

// x (M, K) bf16/fp16 (fp32 on the CPU kernel) with a contiguous last dimension; weight (N, K); lora_a
// (L, S, r, K) and lora_b (L, N, r) of x's dtype, contiguous: L adapters, S slices (fused projections:
// slice s owns output columns [slice_offsets[s], slice_offsets[s + 1]), each a multiple of 8, and has its
// own lora_a[:, s]; lora_b stacks the slices' B along N like weight); N and K multiples of 8, r a
// multiple of 8 (the Python layer pads A and B), 8 <= r <= 256, S <= kMaxSlices.
//
// adapter_ids (M) int32 or null: row m uses adapter adapter_ids[m], -1 (or any id outside [0, L), which
// the Python layer refuses before the call) none; null: adapter 0 for every row (L must be 1).
// row_order (M) int32 or null (only with adapter_ids; the CUDA kernels' segment-style order at large
// M): the kernels' row r is x's row row_order[r] (a permutation of [0, M)) and adapter_ids[r] its
// adapter, so adapter_ids is given in that order (sorted: each row tile then holds one or two
// adapters); out's rows stay x's, shrink's rows are in that order.
// ranks (L) int32 or null: adapter l reads only lora_a[l, :, :ranks[l]] and lora_b[l, :, :ranks[l]]
// (ranks in [0, r]; null: r for all); scales (L, S) float32 or null: the scale of (adapter, slice)
// (null: `scale` for all). bias float32 (N) or null.
//
// shrink (M, S r) x's dtype: written, row m's slice s columns = scale (x_lora[m] A[l, s]ᵀ) for its adapter
// l (zero past ranks[l], zero for rows without an adapter), kept for a backward; out (M, N) x's dtype;
// workspace float32 with at least lora_workspace(...) elements (split-K at small M), tiles int32 with at
// least lora_tiles(...) (the blocks' adapter lists; CUDA only).
//
// transposed (the backward's dx, one adapter and one slice, no ids, ranks or scales): x is dy (M, N),
// out (M, K) = dy W + [scale (dy B)] A, shrink (M, r) = scale dy B; every weight read k-major (as
// stored), bias null.
// x_lora (optional, like x): the shrink's input instead of x (dropout(x), computed by `dropout`).
// int4 base (extras.int4, forward only): weight is quantize_int4's packed codes, N = 8 * its first
// dimension and K = x's columns; the fused kernel dequantizes it in its main loop (quant/int4_loader.cuh).
struct Int4Base {   // an int4 base weight (llmkernels.quant.quantize_int4; quant.h's format)
  const TensorView* scales = nullptr;   // (groups, N) of x's dtype
  const TensorView* zeros = nullptr;    // (groups, N) uint8
  int64_t group_size = 0;               // 32, 64, 128, or K (one group per row)
};
struct Extras {   // the optional inputs (null: absent)
  const TensorView* x_lora = nullptr;
  const TensorView* bias = nullptr;
  const TensorView* adapter_ids = nullptr;
  const TensorView* ranks = nullptr;
  const TensorView* scales = nullptr;
  const TensorView* row_order = nullptr;   // with adapter_ids: rows sorted by adapter (below)
  Int4Base int4;   // with scales set, weight is the packed codes int32 (N / 8, ceil(K / 32), 32)
};
constexpr int kMaxSlices = 8;
void lora_linear(const TensorView& x, const TensorView& weight, const TensorView& lora_a, const TensorView& lora_b,
                 double scale, const Extras& optional, const std::vector<int64_t>& slices, bool transposed,
                 const TensorView& shrink, const TensorView& out, const TensorView& workspace,
                 const TensorView& tiles, void* stream);

// The k of the fused product's split-K plan: an upper bound of a block's k (the base, then the groups of
// the adapters its rows use: at most min(M, L), each with its slices' ranks); multi: adapter ids given.
LLMK_HD int64_t fused_k_bound(int64_t m, int64_t k_in, int64_t r, int64_t adapters, int64_t slices, bool multi) {
  return padded(k_in) + (multi ? (m < adapters ? m : adapters) : 1) * slices * padded(r);
}
LLMK_HD int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Rows per tile of the shrink's tiling and of the fused product's three (lora_cuda.cu checks them):
// the adapter lists are kept per row tile.
constexpr int64_t kShrinkTileRows = 64;
constexpr int64_t kFusedTileRows[3] = {16, 64, 128};
LLMK_HD int64_t tiles_size(int64_t m, int64_t rows, int64_t adapters) {   // [count, list of min(rows, L)] per tile
  return (m + rows - 1) / rows * ((rows < adapters ? rows : adapters) + 1);
}

// Upper bounds the Python layer allocates (shapes it can compute while torch.compile traces): the
// split-K partial sums (float32) and the adapter lists (int32) for M rows, N outputs, K inputs, rank r,
// L adapters (ids given: multi) and S slices.
inline int64_t lora_workspace(int64_t m, int64_t n_out, int64_t k_in, int64_t r, int64_t adapters, int64_t slices,
                              bool multi) {
  return gemm::split_k_workspace(m, n_out, fused_k_bound(m, k_in, r, adapters, slices, multi));
}
inline int64_t lora_tiles(int64_t m, int64_t adapters, bool multi) {
  if (!multi) return 0;
  int64_t fused = 0;
  for (int64_t rows : kFusedTileRows) fused = tiles_size(m, rows, adapters) > fused ? tiles_size(m, rows, adapters) : fused;
  return tiles_size(m, kShrinkTileRows, adapters) + fused;
}

// In the kernels' terms: in_features = x's columns (K, or N transposed), out_features = out's (N, or K).
struct Problem {
  DType dtype = DType::bf16;
  int64_t m = 0, in_features = 0, out_features = 0, rank = 0, ldx = 0, ld_lora = 0;
  int64_t adapters = 1, slices = 1;
  int64_t slice_offsets[kMaxSlices + 1] = {};
  bool transposed = false;
  float scale = 1.0f;
  const void* x = nullptr;
  const void* x_lora = nullptr;   // the shrink's input (x itself without dropout)
  const void* weight = nullptr;   // (N, K) x's dtype, or with int4: the packed codes (quant.h)
  bool int4 = false;              // an int4 base weight (forward only): weight packed, w_scales, w_zeros
  const void* w_scales = nullptr; // (groups, N) bf16/fp16: x's dtype on CUDA
  DType w_scale_dtype = DType::bf16;
  const uint8_t* w_zeros = nullptr;
  int64_t group_size = 0;         // K for one group per row
  const void* lora_a = nullptr;
  const void* lora_b = nullptr;
  const float* bias = nullptr;
  const int32_t* adapter_ids = nullptr;
  const int32_t* row_order = nullptr;
  // x's row of the kernels' row `row` (< m); -1 for a row_order entry outside [0, m), which the kernels
  // skip (read as zeros, never stored; the Python layer's order is a permutation).
  LLMK_HD int64_t x_row(int64_t row) const {
    const int64_t r = row_order ? int64_t(row_order[row]) : row;
    return r >= 0 && r < m ? r : -1;
  }
  const int32_t* ranks = nullptr;
  const float* scales = nullptr;
  void* shrink = nullptr;
  void* out = nullptr;
  float* workspace = nullptr;
  int32_t* tiles = nullptr;

  // (clamped to [0, r]: a rank outside it, which the Python layer refuses when it may read the ranks,
  // never reads past an adapter's rows)
  LLMK_HD int32_t rank_of(int32_t adapter) const {
    const int32_t r = ranks ? ranks[adapter] : int32_t(rank);
    return r < 0 ? 0 : r > rank ? int32_t(rank) : r;
  }
  LLMK_HD float scale_of(int32_t adapter, int64_t slice) const {
    return scales ? scales[adapter * slices + slice] : scale;
  }
  LLMK_HD int64_t slice_of(int64_t column) const {
    int64_t s = 0;
    while (s + 1 < slices && slice_offsets[s + 1] <= column) ++s;
    return s;
  }
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
