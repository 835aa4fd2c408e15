// The tensor-core GEMM core (docs/gemm.md): out = epilogue(A · Bᵀ), A (m, k) row-major (or rows
// gathered through an index list), B (n, k) row-major like nn.Linear's weight, fp32 accumulation.
// The quantized GEMM, MoE and LoRA families are this core with another A loader, B loader or
// epilogue; users get torch.matmul for the plain case, so the core is exposed to tests and
// benchmarks only (`llmkernels._gemm`).
//
// Epilogue, per output element (row i, column j), in fp32:
//   v = acc[i][j] * row_scale[i] * col_scale[j]     (each scale optional)
//   v = v + bias[j]                                  (optional)
//   v = activation(v)                                none | silu | gelu (erf) |
//                                                    swiglu: columns are (gate, up) pairs,
//                                                    out[i][j/2] = silu(v[i][j]) * v[i][j+1], j even
//   out[i][j'] = v            or   out[i][j'] += v    (accumulate: adds into the existing output)
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/hd_math.h"
#include "core/backend.h"
#include "core/tensor.h"

namespace llmk::gemm {

enum class Activation : int { none = 0, silu = 1, gelu = 2, swiglu = 3 };

struct Problem {
  DType dtype = DType::bf16;      // of A and B: bf16 or f16 (f32 too on the CPU backend)
  DType out_dtype = DType::bf16;  // dtype, or f32
  int64_t m = 0, n = 0, k = 0;    // out is (m, n) or (m, n / 2) for swiglu; n and k multiples of 8
  const void* a = nullptr;
  int64_t lda = 0;                // elements between rows of A
  const int32_t* a_rows = nullptr;  // optional: row i of A is a + a_rows[i] * lda (gathered rows)
  const void* b = nullptr;
  int64_t ldb = 0;
  bool b_k_major = false;         // B given as (k, n) row-major: out = A · B (ldb = n); else (n, k)
  void* out = nullptr;
  int64_t ldo = 0;
  const float* bias = nullptr;       // (n,)
  const float* row_scale = nullptr;  // (m,)
  const float* col_scale = nullptr;  // (n,)
  Activation activation = Activation::none;
  bool accumulate = false;
  float* workspace = nullptr;        // split_k_workspace(m, n, k) floats, for the CUDA kernel's split-K

  int64_t out_columns() const { return activation == Activation::swiglu ? n / 2 : n; }
};

// Split-K of the CUDA kernel (gemm_cuda.cu) for small M: with M <= 16 the GEMM reads the weights and
// little else, and N / 32 column tiles alone leave most SMs idle (N = 1024: 32 blocks for 132 SMs).
// So K is cut into `splits` ranges of whole k tiles (at least 4 of 64 each, at most 16 ranges,
// aiming at two blocks per H100 SM); each writes fp32 partial sums to a workspace of
// splits * m * n floats, and a second kernel adds them and runs the epilogue. 1 means no split.
struct SplitK {
  int splits = 1;
  int64_t tiles_per_split = 0;  // of kSplitTileK elements
};
constexpr int64_t kSplitMaxRows = 16, kSplitMaxRanges = 16, kSplitTileN = 32, kSplitTileK = 64;
// The plan for `col_blocks` blocks over N and K in `k_tiles` tiles: ranges of at least `min_tiles`
// tiles, at most kSplitMaxRanges of them, aiming at `target_blocks` blocks in all (quant's small-M
// kernels plan with it too).
inline SplitK plan_split_k(int64_t col_blocks, int64_t k_tiles, int64_t target_blocks, int64_t min_tiles) {
  if (col_blocks <= 0) return SplitK{1, k_tiles};   // (n = 0: nothing to split)
  const int64_t wanted = (target_blocks + col_blocks - 1) / col_blocks;
  const int64_t splits = std::min<int64_t>(std::min<int64_t>(wanted, k_tiles / min_tiles), kSplitMaxRanges);
  if (splits <= 1) return SplitK{1, k_tiles};
  const int64_t per = (k_tiles + splits - 1) / splits;
  return SplitK{int((k_tiles + per - 1) / per), per};  // no empty range
}
inline SplitK split_k(int64_t m, int64_t n, int64_t k) {
  const int64_t k_tiles = (k + kSplitTileK - 1) / kSplitTileK;
  if (m == 0 || m > kSplitMaxRows) return SplitK{1, k_tiles};
  return plan_split_k((n + kSplitTileN - 1) / kSplitTileN, k_tiles, 2 * 132, 4);
}
// The floats split-K needs for (m, n, k): at most kSplitMaxRanges * m * n, and only for m <= kSplitMaxRows
// (the Python layer allocates that bound: a size it can compute while torch.compile traces).
inline int64_t split_k_workspace(int64_t m, int64_t n, int64_t k) {
  const SplitK s = split_k(m, n, k);
  return s.splits > 1 ? int64_t(s.splits) * m * n : 0;
}

// Entry point: validates (the checks in gemm.cpp), then runs the CPU kernel, the emulated CUDA
// kernel or the CUDA kernel. Optional views may be null. b_k_major: b is (k, n) and out = A · B. `workspace` is float32 with at least
// split_k_workspace(m, n, k) elements (the CPU kernel does not use it).
void gemm(const TensorView& a, const TensorView* a_rows, const TensorView& b, const TensorView& out,
          const TensorView* bias, const TensorView* row_scale, const TensorView* col_scale,
          Activation activation, bool accumulate, const TensorView& workspace, bool b_k_major, void* stream);

// The kernels: gemm_cpu.cpp, and gemm_cuda.cu compiled by nvcc (CudaStream) and for the emulator
// (EmuStream).
void gemm_cpu(const Problem& problem);
void gemm_device(const Problem& problem, CudaStream stream);
void gemm_device(const Problem& problem, EmuStream stream);

// The epilogue's activations, shared by the CPU and CUDA kernels.
LLMK_HD float silu(float v) { return v / (1.0f + expf(-v)); }
LLMK_HD float gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

}  // namespace llmk::gemm
