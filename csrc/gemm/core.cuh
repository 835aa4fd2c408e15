// The tensor-core GEMM core's parts (docs/gemm.md): a tiling, tile loaders, the main loop and the
// epilogue. A kernel is these parts composed (gemm_cuda.cu); the quantized GEMM, MoE and LoRA kernels
// compose the same main loop with their own B loader (dequantizing), A loader (gathered rows) or
// epilogue (routing weights, LoRA expand).
//
//   block (bm x bn of C)                      warp (bm/warps_m x bn/warps_n)
//   +---------+---------+---------+           mma tiles of 16 x 8, each warp owns
//   | warp 0  | warp 1  | ...     |           mma_m x mma_n of them: acc[mma_m][mma_n][4]
//   +---------+---------+---------+
//   | warp wn | ...                           K is walked in tiles of bk through a ring of `stages`
//   +---------+                               shared-memory buffers filled by cp.async
//
// Shared tiles hold rows of bk 16-bit elements (64 or 128 bytes) in SwizzledTile order: the cp.async
// writes of a quarter-warp and the eight rows of each ldmatrix phase fall in eight distinct bank
// groups (no bank conflicts; the emulator counts them, tests/test_gemm.py checks zero).
#pragma once
#include <cstdint>

#include "common/cp_async.h"
#include "common/device.h"
#include "common/float_types.h"
#include "common/ldmatrix.h"
#include "common/mma.h"
#include "common/swizzle.h"
#include "common/vector_io.h"
#include "gemm/gemm.h"

namespace llmk::gemm {

// Block tile bm x bn, k tile bk, warps_m x warps_n warps, `stages` buffers in the cp.async ring.
template <int BM, int BN, int BK, int WarpsM, int WarpsN, int Stages>
struct Tiling {
  static constexpr int bm = BM, bn = BN, bk = BK, stages = Stages;
  static constexpr int warps_m = WarpsM, warps_n = WarpsN;
  static constexpr int threads = 32 * WarpsM * WarpsN;
  static constexpr int warp_m = BM / WarpsM, warp_n = BN / WarpsN;  // a warp's part of C
  static constexpr int mma_m = warp_m / 16, mma_n = warp_n / 8;      // its mma tiles
  static constexpr int row_bytes = BK * 2;                           // 16-bit elements
  static constexpr int a_bytes = BM * row_bytes, b_bytes = BN * row_bytes;
  static constexpr int stage_bytes = a_bytes + b_bytes;
  static constexpr int shared_bytes = Stages * stage_bytes;
  static_assert(BK == 32 || BK == 64, "k tiles of 64 or 128 bytes (SwizzledTile)");
  static_assert(warp_m % 16 == 0 && warp_n % 16 == 0, "a warp covers whole 16x16 ldmatrix.x4 blocks of A and B");
  static_assert(Stages >= 2, "a ring of at least two stages");
  static constexpr SwizzledTile layout() { return SwizzledTile{row_bytes}; }
};

// Loads rows [row0, row0 + Rows) x columns [k0, k0 + bk) of a row-major matrix of 16-bit elements
// into a swizzled shared tile with 16-byte cp.async copies; rows at or past `rows` and columns at or
// past `k` are zero-filled (nothing out of bounds is read: k is a multiple of 8, so a 16-byte chunk is
// wholly inside or outside). With `row_index`, tile row r is matrix row row_index[row0 + r]
// (gathered rows, for MoE).
template <typename T, typename Tiling, int Rows>
struct RowTileLoader {
  const T* base;
  int64_t ld;                  // elements between rows
  int64_t rows, k;
  const int32_t* row_index;    // optional

  LLMK_DEVICE void load(uint8_t* tile, int64_t row0, int64_t k0, int thread) const {
    constexpr int chunks_per_row = Tiling::bk / 8;
    constexpr int chunks = Rows * chunks_per_row;
    static_assert(chunks % Tiling::threads == 0, "every thread copies the same number of chunks");
    constexpr SwizzledTile layout = Tiling::layout();
#pragma unroll
    for (int c = thread; c < chunks; c += Tiling::threads) {
      const int r = c / chunks_per_row, chunk = c % chunks_per_row;
      const int64_t row = row0 + r, column = k0 + 8 * chunk;
      const bool inside = row < rows && column < k;
      const T* source = base;
      if (inside) source = base + (row_index ? int64_t(load_global(row_index + row)) : row) * ld + column;
      cp_async<16>(tile + layout.offset(r, 16 * chunk), source, inside ? 16 : 0);
    }
  }
};

// The accumulators of one thread.
template <typename Tiling>
struct Accumulators {
  float v[Tiling::mma_m][Tiling::mma_n][4];
};

// One k tile from shared memory: ldmatrix the warp's A and B fragments, mma_m x mma_n mmas per 16 of k.
template <typename T, typename Tiling>
LLMK_DEVICE void multiply_tile(Accumulators<Tiling>& acc, const uint8_t* a_tile, const uint8_t* b_tile, int warp_row0,
                               int warp_col0, int lane) {
  constexpr SwizzledTile layout = Tiling::layout();
#pragma unroll
  for (int kk = 0; kk < Tiling::bk / 16; ++kk) {
    uint32_t a[Tiling::mma_m][4];
    uint32_t b[Tiling::mma_n][2];
#pragma unroll
    for (int i = 0; i < Tiling::mma_m; ++i) {
      // lanes 0-15: rows 0-15 at k 0-7; lanes 16-31: the same rows at k 8-15 (mma.h's A order)
      const int row = warp_row0 + 16 * i + lane % 16;
      ldmatrix<4>(a[i], a_tile + layout.offset(row, 2 * (16 * kk + 8 * (lane / 16))));
    }
#pragma unroll
    for (int j = 0; j < Tiling::mma_n; j += 2) {
      // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
      const int row = warp_col0 + 8 * j + 8 * (lane / 16) + lane % 8;
      uint32_t r[4];
      ldmatrix<4>(r, b_tile + layout.offset(row, 2 * (16 * kk + 8 * ((lane / 8) % 2))));
      b[j][0] = r[0];
      b[j][1] = r[1];
      b[j + 1][0] = r[2];
      b[j + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < Tiling::mma_m; ++i)
#pragma unroll
      for (int j = 0; j < Tiling::mma_n; ++j) mma_m16n8k16<T>(acc.v[i][j], a[i], b[j], acc.v[i][j]);
  }
}

// The main loop: acc = A[block rows] · B[block cols]ᵀ over k tiles [first_tile, first_tile + k_tiles)
// (all of K, or one split-K range), through the cp.async ring. One barrier per k tile: after it,
// tile kt has landed for everyone, and every thread has finished reading the stage that the
// prefetch of tile kt + stages - 1 overwrites (it held tile kt - 1).
template <typename T, typename Tiling, typename LoaderA, typename LoaderB>
LLMK_DEVICE void main_loop(Accumulators<Tiling>& acc, const LoaderA& a, const LoaderB& b, int64_t row0, int64_t col0,
                           int64_t first_tile, int64_t k_tiles) {
  uint8_t* shared = dynamic_shared_memory();
  const int thread = int(threadIdx.x), lane = thread % 32, warp = thread / 32;
  const int warp_row0 = (warp / Tiling::warps_n) * Tiling::warp_m;
  const int warp_col0 = (warp % Tiling::warps_n) * Tiling::warp_n;
#pragma unroll
  for (int i = 0; i < Tiling::mma_m; ++i)
#pragma unroll
    for (int j = 0; j < Tiling::mma_n; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc.v[i][j][e] = 0.0f;

  auto stage = [&](int s) { return shared + s * Tiling::stage_bytes; };
  auto load = [&](int s, int64_t kt) {
    a.load(stage(s), row0, (first_tile + kt) * Tiling::bk, thread);
    b.load(stage(s) + Tiling::a_bytes, col0, (first_tile + kt) * Tiling::bk, thread);
  };
#pragma unroll
  for (int s = 0; s < Tiling::stages - 1; ++s) {
    if (s < k_tiles) load(s, s);
    cp_async_commit();  // empty groups keep the count uniform
  }
  // The ring positions advance by one per k tile (no 64-bit modulo in the loop).
  int read_stage = 0, write_stage = Tiling::stages - 1;
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Tiling::stages - 2>();
    __syncthreads();
    if (kt + Tiling::stages - 1 < k_tiles) load(write_stage, kt + Tiling::stages - 1);
    cp_async_commit();
    const uint8_t* current = stage(read_stage);
    multiply_tile<T, Tiling>(acc, current, current + Tiling::a_bytes, warp_row0, warp_col0, lane);
    read_stage = read_stage + 1 == Tiling::stages ? 0 : read_stage + 1;
    write_stage = write_stage + 1 == Tiling::stages ? 0 : write_stage + 1;
  }
}

// The epilogue of gemm.h: scales, bias, activation, store or accumulate, straight from registers.
// Each thread owns pairs of adjacent columns (mma.h's C layout), so a pair is one 4- or 8-byte store
// and a SwiGLU (gate, up) pair is one output element.
struct Epilogue {
  void* out;
  int64_t ldo;
  bool out_is_f32;
  const float* bias;
  const float* row_scale;
  const float* col_scale;
  Activation activation;
  bool accumulate;
  int64_t m, n;

  template <typename OutT>
  LLMK_DEVICE void store_pair(int64_t row, int64_t col, float v0, float v1) const {
    if (row_scale) {
      const float s = load_global(row_scale + row);
      v0 *= s;
      v1 *= s;
    }
    // (scalar loads: the Python layer does not promise these vectors 8-byte alignment)
    if (col_scale) {
      v0 *= load_global(col_scale + col);
      v1 *= load_global(col_scale + col + 1);
    }
    if (bias) {
      v0 += load_global(bias + col);
      v1 += load_global(bias + col + 1);
    }
    OutT* base = static_cast<OutT*>(out) + row * ldo;
    if (activation == Activation::swiglu) {
      OutT* p = base + col / 2;
      float v = silu(v0) * v1;
      if (accumulate) v += to_float(load_global(p));
      store_global(p, from_float<OutT>(v));
      return;
    }
    if (activation != Activation::none) {
      v0 = activation == Activation::silu ? silu(v0) : gelu(v0);
      v1 = activation == Activation::silu ? silu(v1) : gelu(v1);
    }
    auto* p = reinterpret_cast<Vec<OutT, 2>*>(base + col);
    if (accumulate) {
      const Vec<OutT, 2> old = load_global(p);
      v0 += to_float(old[0]);
      v1 += to_float(old[1]);
    }
    store_global(p, Vec<OutT, 2>{{from_float<OutT>(v0), from_float<OutT>(v1)}});
  }

  // Calls fn(row, col, v0, v1) for each pair of adjacent columns this thread holds inside (m, n):
  // the (row g) and (row g + 8) pairs of mma_c_coord in each of its mma tiles.
  template <typename Tiling, typename Fn>
  LLMK_DEVICE void for_each_pair(const Accumulators<Tiling>& acc, int64_t row0, int64_t col0, Fn&& fn) const {
    const int thread = int(threadIdx.x), lane = thread % 32, warp = thread / 32;
    const int64_t warp_row0 = row0 + (warp / Tiling::warps_n) * Tiling::warp_m;
    const int64_t warp_col0 = col0 + (warp % Tiling::warps_n) * Tiling::warp_n;
#pragma unroll
    for (int i = 0; i < Tiling::mma_m; ++i)
#pragma unroll
      for (int j = 0; j < Tiling::mma_n; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const FragmentCoord c = mma_c_coord(lane, 2 * h);
          const int64_t row = warp_row0 + 16 * i + c.row, col = warp_col0 + 8 * j + c.col;
          if (row < m && col < n) fn(row, col, acc.v[i][j][2 * h], acc.v[i][j][2 * h + 1]);
        }
  }

  template <typename OutT, typename Tiling>
  LLMK_DEVICE void store(const Accumulators<Tiling>& acc, int64_t row0, int64_t col0) const {
    for_each_pair(acc, row0, col0, [&](int64_t row, int64_t col, float v0, float v1) { store_pair<OutT>(row, col, v0, v1); });
  }

  // Split-K: this range's raw sums, fp32, into partial[row * n + col] (the epilogue runs after the
  // ranges are added: split_k_reduce_kernel).
  template <typename Tiling>
  LLMK_DEVICE void store_partial(const Accumulators<Tiling>& acc, int64_t row0, int64_t col0, float* partial) const {
    for_each_pair(acc, row0, col0, [&](int64_t row, int64_t col, float v0, float v1) {
      store_global(reinterpret_cast<Vec<float, 2>*>(partial + row * n + col), Vec<float, 2>{{v0, v1}});
    });
  }
};

}  // namespace llmk::gemm
