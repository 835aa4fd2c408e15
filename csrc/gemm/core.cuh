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
#include <type_traits>

#include "common/cp_async.h"
#include "common/launch.h"
#include "common/device.h"
#include "common/float_types.h"
#include "common/ldmatrix.h"
#include "common/mma.h"
#include "common/swizzle.h"
#include "common/vector_io.h"
#include "gemm/gemm.h"

namespace llmk::gemm {

// Block tile bm x bn, k tile bk (elements of ElementBytes bytes: 2 for bf16/fp16, 1 for int8),
// warps_m x warps_n warps, `stages` buffers in the cp.async ring. Each mma step consumes 32 bytes of
// every A and B row (k 16 of bf16/fp16, k 32 of int8), so a k tile is row_bytes / 32 mma steps.
template <int BM, int BN, int BK, int WarpsM, int WarpsN, int Stages, int ElementBytes = 2>
struct Tiling {
  static constexpr int bm = BM, bn = BN, bk = BK, stages = Stages;
  static constexpr int warps_m = WarpsM, warps_n = WarpsN;
  static constexpr int threads = 32 * WarpsM * WarpsN;
  static constexpr int warp_m = BM / WarpsM, warp_n = BN / WarpsN;  // a warp's part of C
  static constexpr int mma_m = warp_m / 16, mma_n = warp_n / 8;      // its mma tiles
  static constexpr int row_bytes = BK * ElementBytes;
  static constexpr int k_steps = row_bytes / 32;                     // mma steps per k tile
  static constexpr int a_bytes = BM * row_bytes, b_bytes = BN * row_bytes;  // dense A and B tiles
  static constexpr int stage_bytes = a_bytes + b_bytes;
  static constexpr int shared_bytes = Stages * stage_bytes;
  static_assert(row_bytes == 64 || row_bytes == 128, "k tiles of 64 or 128 bytes (SwizzledTile)");
  static_assert(warp_m % 16 == 0 && warp_n % 16 == 0, "a warp covers whole 16x16 ldmatrix.x4 blocks of A and B");
  static_assert(Stages >= 2, "a ring of at least two stages");
  static constexpr SwizzledTile layout() { return SwizzledTile{row_bytes}; }
};

// The 16-bit GEMM's tilings (gemm_cuda.cu says why these; the LoRA kernels use them too): large
// 128 x 128 x 32, 8 warps, 4 stages; medium 64 x 64 x 32, 4 warps; small 16 x 32 x 64, 2 warps, 6
// stages (M <= 16, with split-K).
using LargeTiling = Tiling<128, 128, 32, 2, 4, 4>;
using MediumTiling = Tiling<64, 64, 32, 2, 2, 4>;
using SmallTiling = Tiling<16, 32, 64, 1, 2, 6>;

// One mma step on a 16 x 8 tile: bf16/fp16 (m16n8k16, fp32 accumulators) or int8 (m16n8k32, int32).
template <typename T, typename Acc>
LLMK_DEVICE void mma_step(Acc (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, int8_t>) mma_m16n8k32_s8(acc, a, b, acc);
  else mma_m16n8k16<T>(acc, a, b, acc);
}

// Loads rows [row0, row0 + Rows) x columns [k0, k0 + bk) of a row-major matrix (T: bf16, fp16 or
// int8) into a swizzled shared tile with 16-byte cp.async copies; rows at or past `rows` and columns
// at or past `k` are zero-filled (nothing out of bounds is read: k is a multiple of 8, so a chunk of
// 16-bit elements is wholly inside or outside). With `row_index`, tile row r is matrix row
// row_index[row0 + r] (gathered rows, for MoE; a negative index is a zero row). With `pair_half` h > 0,
// tile row r is matrix row r / 2 + (r % 2) h: a stacked [gate; up] weight read as adjacent (gate, up)
// pairs for the swiglu epilogue. int8 rows: 16-byte chunks when ld and k are multiples
// of 16 (`aligned16`), else 8-byte halves (rows that start 8 bytes past a 16-byte boundary).
//
// As B, `fragments` gives the warp's B fragments of one mma step by ldmatrix.x4 (rows of the tile are
// columns of B: W (n, k) row-major). Other B loaders (the quantized GEMM's dequantizing one) have the
// same two functions and `bytes`.
template <typename T, typename Tiling, int Rows>
struct RowTileLoader {
  // Rows of bk elements of T: Tiling::row_bytes for the mma inputs, bk bytes for an int8 weight
  // beside 16-bit activations (the quantized GEMM's W8A16 loader).
  static constexpr int row_bytes = Tiling::bk * int(sizeof(T));
  static constexpr int bytes = Rows * row_bytes;  // of the shared tile
  const T* base;
  int64_t ld;                  // elements between rows
  int64_t rows, k;
  const int32_t* row_index;    // optional
  bool aligned16 = true;       // int8 only: false when rows may start 8 bytes past a 16-byte boundary
  int64_t pair_half = 0;       // optional: interleave rows [0, h) and [h, 2h)

  // The matrix row of logical row `row` (< rows), or -1 for a zero row.
  LLMK_DEVICE int64_t source_row(int64_t row) const {
    if (row_index) return int64_t(load_global(row_index + row));
    return pair_half ? (row >> 1) + (row & 1) * pair_half : row;
  }

  static constexpr SwizzledTile layout() { return SwizzledTile{row_bytes}; }

  LLMK_DEVICE void load(uint8_t* tile, int64_t row0, int64_t k0, int thread) const {
    constexpr int chunks_per_row = row_bytes / 16;
    constexpr int per_chunk = 16 / int(sizeof(T));  // elements of a 16-byte chunk
    constexpr int chunks = Rows * chunks_per_row;
    static_assert(chunks % Tiling::threads == 0, "every thread copies the same number of chunks");
    constexpr SwizzledTile layout = RowTileLoader::layout();
    if constexpr (sizeof(T) == 1) {
      if (!aligned16) {
        // 8-byte halves, consecutive threads on consecutive halves (a warp writes 256 contiguous
        // bytes of the tile per instruction, as with 16-byte chunks)
#pragma unroll
        for (int h = thread; h < 2 * chunks; h += Tiling::threads) {
          const int r = h / 2 / chunks_per_row, chunk = h / 2 % chunks_per_row;
          const int64_t row = row0 + r, column = k0 + per_chunk * chunk + 8 * (h % 2);
          const int64_t matrix_row = row < rows ? source_row(row) : -1;
          const bool inside = matrix_row >= 0 && column < k;
          const T* source = inside ? base + matrix_row * ld + column : base;
          cp_async<8>(tile + layout.offset(r, 16 * chunk + 8 * (h % 2)), source, inside ? 8 : 0);
        }
        return;
      }
    }
#pragma unroll
    for (int c = thread; c < chunks; c += Tiling::threads) {
      const int r = c / chunks_per_row, chunk = c % chunks_per_row;
      const int64_t row = row0 + r, column = k0 + per_chunk * chunk;
      const int64_t matrix_row = row < rows ? source_row(row) : -1;
      const bool inside = matrix_row >= 0 && column < k;
      const T* source = inside ? base + matrix_row * ld + column : base;
      cp_async<16>(tile + layout.offset(r, 16 * chunk), source, inside ? 16 : 0);
    }
  }

  // As A: the warp's A fragments of mma step kk for its mma_m row tiles: lanes 0-15 address rows 0-15
  // at bytes 0-15 of the step, lanes 16-31 the same rows at bytes 16-31 (mma.h's A order: 16-bit
  // k 0-7 then 8-15, or int8 k 0-15 then 16-31).
  LLMK_DEVICE void a_fragments(uint32_t (&a)[Tiling::mma_m][4], const uint8_t* tile, int kk, int warp_row0,
                               int lane) const {
    static_assert(row_bytes == Tiling::row_bytes, "ldmatrix fragments from rows of the mma inputs' type");
    constexpr SwizzledTile layout = Tiling::layout();
#pragma unroll
    for (int i = 0; i < Tiling::mma_m; ++i)
      ldmatrix<4>(a[i], tile + layout.offset(warp_row0 + 16 * i + lane % 16, 32 * kk + 16 * (lane / 16)));
  }

  // B fragments of mma step kk for the warp's mma_n column tiles: matrices (n 0-7, bytes 0-15),
  // (n 0-7, bytes 16-31), (n 8-15, bytes 0-15), (n 8-15, bytes 16-31) of each 16 columns, which are
  // mma.h's B registers for bf16/fp16 (k 2t.., 2t+8..) and for int8 (k 4t.., 4t+16..) alike.
  LLMK_DEVICE void fragments(uint32_t (&b)[Tiling::mma_n][2], const uint8_t* tile, int kk, int warp_col0,
                             int lane) const {
    static_assert(row_bytes == Tiling::row_bytes, "ldmatrix fragments from rows of the mma inputs' type");
    constexpr SwizzledTile layout = Tiling::layout();
#pragma unroll
    for (int j = 0; j < Tiling::mma_n; j += 2) {
      const int row = warp_col0 + 8 * j + 8 * (lane / 16) + lane % 8;
      uint32_t r[4];
      ldmatrix<4>(r, tile + layout.offset(row, 32 * kk + 16 * ((lane / 8) % 2)));
      b[j][0] = r[0];
      b[j][1] = r[1];
      b[j + 1][0] = r[2];
      b[j + 1][1] = r[3];
    }
  }
};

// An operand stored k-major, (k, cols) row-major: B as (k, n) (out = A · B, e.g. x @ W for a weight
// used transposed in a backward pass) or A as (k, m) (out = Aᵀ · B: a weight gradient, the sum over
// rows r of a[r]ᵀ b[r]). Tiles of bk rows of k by Cols (bn or bm) columns, swizzled rows of Cols
// 16-bit elements, and fragments by ldmatrix.x4.trans, which gives lane 4g + t the elements (k 2t,
// 2t + 1; column g) of an 8 x 8 block: an mma B register, or an A register of the transposed block.
// With `row_index`, tile row r is matrix row row_index[k0 + r] (rows gathered along k, for MoE's weight
// gradients; a negative index is a zero row). Rows at or past k and columns at or past `cols` are
// zero-filled.
template <typename T, typename Tiling, int Cols = Tiling::bn>
struct KMajorTileLoader {
  static_assert(sizeof(T) == 2, "16-bit operands");
  static constexpr int row_bytes = Cols * 2;
  static constexpr int bytes = Tiling::bk * row_bytes;
  static constexpr SwizzledTile layout() { return SwizzledTile{row_bytes}; }
  const T* base;
  int64_t ld;   // elements between rows of k (cols for a contiguous (k, cols) matrix)
  int64_t cols, k;
  const int32_t* row_index = nullptr;   // optional

  LLMK_DEVICE void load(uint8_t* tile, int64_t col0, int64_t k0, int thread) const {
    constexpr int chunks_per_row = Cols / 8;
    constexpr int chunks = Tiling::bk * chunks_per_row;
    static_assert(chunks % Tiling::threads == 0, "every thread copies the same number of chunks");
    constexpr SwizzledTile tile_layout = layout();
#pragma unroll
    for (int c = thread; c < chunks; c += Tiling::threads) {
      const int r = c / chunks_per_row, chunk = c % chunks_per_row;
      const int64_t row = k0 + r, column = col0 + 8 * chunk;
      const int64_t source = row >= k ? -1 : row_index ? int64_t(load_global(row_index + row)) : row;
      const bool inside = source >= 0 && column < cols;
      cp_async<16>(tile + tile_layout.offset(r, 16 * chunk), inside ? base + source * ld + column : base,
                   inside ? 16 : 0);
    }
  }

  // As B: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) of each 16 columns.
  LLMK_DEVICE void fragments(uint32_t (&b)[Tiling::mma_n][2], const uint8_t* tile, int kk, int warp_col0,
                             int lane) const {
    constexpr SwizzledTile tile_layout = layout();
    const int matrix = lane / 8;
#pragma unroll
    for (int j = 0; j < Tiling::mma_n; j += 2) {
      const int row = 16 * kk + 8 * (matrix % 2) + lane % 8;
      const int column = warp_col0 + 8 * j + 8 * (matrix / 2);
      uint32_t r[4];
      ldmatrix_trans<4>(r, tile + tile_layout.offset(row, 2 * column));
      b[j][0] = r[0];
      b[j][1] = r[1];
      b[j + 1][0] = r[2];
      b[j + 1][1] = r[3];
    }
  }

  // As A: matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15) of each 16
  // rows: mma.h's A registers a0-a3.
  LLMK_DEVICE void a_fragments(uint32_t (&a)[Tiling::mma_m][4], const uint8_t* tile, int kk, int warp_row0,
                               int lane) const {
    constexpr SwizzledTile tile_layout = layout();
    const int matrix = lane / 8;
    const int row = 16 * kk + 8 * (matrix / 2) + lane % 8;
#pragma unroll
    for (int i = 0; i < Tiling::mma_m; ++i)
      ldmatrix_trans<4>(a[i], tile + tile_layout.offset(row, 2 * (warp_row0 + 16 * i + 8 * (matrix % 2))));
  }
};

// Two operands of one layout laid end to end along k: k in [0, split) from `first`, k in [split, ...)
// from `second` at k - split (split a multiple of every bk the kernel may use). The LoRA kernels read
// [x | scale s] as A and [W | B] as B: the low-rank expand becomes extra k tiles of the base GEMM.
template <typename Loader, typename Tiling>
struct ConcatTileLoader {
  static constexpr int bytes = Loader::bytes;
  static constexpr SwizzledTile layout() { return Loader::layout(); }
  Loader first, second;
  int64_t split;

  LLMK_DEVICE void load(uint8_t* tile, int64_t row0, int64_t k0, int thread) const {
    if (k0 < split) first.load(tile, row0, k0, thread);
    else second.load(tile, row0, k0 - split, thread);
  }
  LLMK_DEVICE void a_fragments(uint32_t (&a)[Tiling::mma_m][4], const uint8_t* tile, int kk, int warp_row0,
                               int lane) const {
    first.a_fragments(a, tile, kk, warp_row0, lane);   // (one layout: the fragments do not depend on the source)
  }
  LLMK_DEVICE void fragments(uint32_t (&b)[Tiling::mma_n][2], const uint8_t* tile, int kk, int warp_col0,
                             int lane) const {
    first.fragments(b, tile, kk, warp_col0, lane);
  }
};

// The accumulators of one thread: fp32, or int32 for int8 inputs.
template <typename Tiling, typename E = float>
struct Accumulators {
  E v[Tiling::mma_m][Tiling::mma_n][4];
};

// One k tile from shared memory: the warp's A fragments from the A loader, its B fragments from the B
// loader, mma_m x mma_n mmas per mma step (32 bytes of k).
template <typename T, typename Tiling, typename E, typename LoaderA, typename LoaderB>
LLMK_DEVICE void multiply_tile(Accumulators<Tiling, E>& acc, const uint8_t* a_tile, const uint8_t* b_tile,
                               const LoaderA& loader_a, const LoaderB& loader_b, int warp_row0, int warp_col0,
                               int lane) {
#pragma unroll
  for (int kk = 0; kk < Tiling::k_steps; ++kk) {
    uint32_t a[Tiling::mma_m][4];
    uint32_t b[Tiling::mma_n][2];
    loader_a.a_fragments(a, a_tile, kk, warp_row0, lane);
    loader_b.fragments(b, b_tile, kk, warp_col0, lane);
#pragma unroll
    for (int i = 0; i < Tiling::mma_m; ++i)
#pragma unroll
      for (int j = 0; j < Tiling::mma_n; ++j) mma_step<T>(acc.v[i][j], a[i], b[j]);
  }
}

// A B loader whose k range holds two tile layouts (LoRA's int4 base weight, then its 16-bit adapter)
// declares `segmented = true`, `split` (the first k of the second layout) and the loaders whose
// fragments read each layout, `first` and `second`; the main loop picks one per k tile (uniform
// over the block).
template <typename Loader, typename = void>
struct is_segmented : std::false_type {};
template <typename Loader>
struct is_segmented<Loader, std::void_t<decltype(Loader::segmented)>> : std::bool_constant<Loader::segmented> {};

// A stage of the ring: the A tile, then the B tile (each a multiple of 16 bytes).
template <typename LoaderA, typename LoaderB>
constexpr int stage_bytes_of() {
  static_assert(LoaderA::bytes % 16 == 0 && LoaderB::bytes % 16 == 0, "16-byte aligned tiles");
  return LoaderA::bytes + LoaderB::bytes;
}

// The main loop: acc = A[block rows] · B[block cols]ᵀ over k tiles [first_tile, first_tile + k_tiles)
// (all of K, or one split-K range), through the cp.async ring. One barrier per k tile: after it,
// tile kt has landed for everyone, and every thread has finished reading the stage that the
// prefetch of tile kt + stages - 1 overwrites (it held tile kt - 1).
template <typename T, typename Tiling, typename E, typename LoaderA, typename LoaderB>
LLMK_DEVICE void main_loop(Accumulators<Tiling, E>& acc, const LoaderA& a, const LoaderB& b, int64_t row0, int64_t col0,
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
      for (int e = 0; e < 4; ++e) acc.v[i][j][e] = E(0);

  constexpr int stage_bytes = stage_bytes_of<LoaderA, LoaderB>();
  auto stage = [&](int s) { return shared + s * stage_bytes; };
  auto load = [&](int s, int64_t kt) {
    a.load(stage(s), row0, (first_tile + kt) * Tiling::bk, thread);
    b.load(stage(s) + LoaderA::bytes, col0, (first_tile + kt) * Tiling::bk, thread);
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
    if constexpr (is_segmented<LoaderB>::value) {
      if ((first_tile + kt) * Tiling::bk < b.split)
        multiply_tile<T, Tiling>(acc, current, current + LoaderA::bytes, a, b.first, warp_row0, warp_col0, lane);
      else
        multiply_tile<T, Tiling>(acc, current, current + LoaderA::bytes, a, b.second, warp_row0, warp_col0, lane);
    } else {
      multiply_tile<T, Tiling>(acc, current, current + LoaderA::bytes, a, b, warp_row0, warp_col0, lane);
    }
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
  // the (row g) and (row g + 8) pairs of mma_c_coord in each of its mma tiles, as floats (Raw: as
  // the accumulators are, int32 for int8 inputs).
  template <typename Tiling, typename E, typename Fn, bool Raw = false>
  LLMK_DEVICE void for_each_pair(const Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0, Fn&& fn) const {
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
          if (row < m && col < n) {
            if constexpr (Raw) fn(row, col, acc.v[i][j][2 * h], acc.v[i][j][2 * h + 1]);
            else fn(row, col, float(acc.v[i][j][2 * h]), float(acc.v[i][j][2 * h + 1]));
          }
        }
  }

  // The accumulators themselves into out (m, ldo) of E: int8_matmul's exact int32 sums.
  template <typename Tiling, typename E>
  LLMK_DEVICE void store_raw(const Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0) const {
    auto store = [&](int64_t row, int64_t col, E v0, E v1) {
      store_global(reinterpret_cast<Vec<E, 2>*>(static_cast<E*>(out) + row * ldo + col), Vec<E, 2>{{v0, v1}});
    };
    for_each_pair<Tiling, E, decltype(store)&, true>(acc, row0, col0, store);
  }

  template <typename OutT, typename Tiling, typename E>
  LLMK_DEVICE void store(const Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0) const {
    for_each_pair(acc, row0, col0, [&](int64_t row, int64_t col, float v0, float v1) { store_pair<OutT>(row, col, v0, v1); });
  }

  // Split-K: this range's raw sums, fp32, into partial[row * n + col] (the epilogue runs after the
  // ranges are added: split_k_reduce_kernel).
  template <typename Tiling, typename E>
  LLMK_DEVICE void store_partial(const Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0, float* partial) const {
    for_each_pair(acc, row0, col0, [&](int64_t row, int64_t col, float v0, float v1) {
      store_global(reinterpret_cast<Vec<float, 2>*>(partial + row * n + col), Vec<float, 2>{{v0, v1}});
    });
  }

  // Split-K's second half for one column pair (`pair` of the m * n / 2): adds the `splits` ranges'
  // partial sums in range order (deterministic) and stores them through the epilogue.
  template <typename OutT>
  LLMK_DEVICE void reduce_pair(const float* partial, int splits, int64_t pair) const {
    const int64_t row = pair / (n / 2), col = 2 * (pair % (n / 2));
    if (row >= m) return;
    float v0 = 0.0f, v1 = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const Vec<float, 2> v = load_global(reinterpret_cast<const Vec<float, 2>*>(partial + (s * m + row) * n + col));
      v0 += v[0];
      v1 += v[1];
    }
    store_pair<OutT>(row, col, v0, v1);
  }
};

// -- the kernel: one block per bm x bn tile of C (x one split-K range) ------------------------------
//
// A family's kernel parameters derive from TiledParams and add the pointers its loaders need and two
// functions that build them, `loader_a<Tiling>()` and `loader_b<Tiling>()`; the kernel, the split-K
// reduce and the launcher below are the same for all (gemm_cuda.cu, quant/quant_cuda.cu).
struct TiledParams {
  int64_t m, n, k;
  Epilogue epilogue;
  float* partial;            // split-K: gridDim.z ranges of m * n partial sums; null without split
  int64_t tiles_per_split;   // k tiles per range (all of them without split)
  // Whether the family ever splits K (false: no split-K reduce kernel is compiled for it).
  static constexpr bool split_k = true;

  // Whether block row blockIdx.y has work (a family hides this: MoE's blocks past the last expert),
  // and what a block without work writes over its tile of the output (nothing, by default; MoE's
  // zeros, so that its outputs need no memset first).
  LLMK_DEVICE bool block_active() const { return true; }
  template <typename OutT, typename Tiling>
  LLMK_DEVICE void clear_tile(int64_t, int64_t) const {}
  // This block's k tiles, [first, first + count) of the k_tiles of K: blockIdx.z's split-K range (a
  // family hides this: MoE's weight gradients take expert blockIdx.z's rows, LoRA's blocks the k tiles
  // of the adapters their rows use; count <= 0: none).
  template <typename Tiling>
  LLMK_DEVICE void k_tile_range(int64_t k_tiles, int64_t& first, int64_t& count) const {
    first = int64_t(blockIdx.z) * tiles_per_split;
    count = first + tiles_per_split < k_tiles ? tiles_per_split : k_tiles - first;
  }
  // Elements of out before this block's output matrix (MoE's weight gradients: expert blockIdx.z's).
  LLMK_DEVICE int64_t out_offset() const { return 0; }
  // Stores a finished tile (not split) through the epilogue, at `offset` elements into out; a family
  // with an epilogue of its own hides this (MoE's backward: the activation's gradient from dZ).
  template <typename OutT, typename Tiling, typename E>
  LLMK_DEVICE void store_tile(const Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0, int64_t offset) const {
    Epilogue e = epilogue;
    if (e.out_is_f32) {
      e.out = static_cast<float*>(e.out) + offset;
      e.template store<float>(acc, row0, col0);
    } else {
      e.out = static_cast<OutT*>(e.out) + offset;
      e.template store<OutT>(acc, row0, col0);
    }
  }
};

// T: the mma inputs (bf16, fp16, int8); OutT: the 16-bit output type when the output is not fp32,
// or E itself for the raw accumulators (int8_matmul; no split-K then); E: the accumulators (float,
// int32).
// (__launch_bounds__(threads, 1): without the 1, ptxas capped the gemm's large tiling at 128
// registers and spilled 8 bytes on sm_80; with it, 154 registers, no spill, one 8-warp block per SM.)
template <typename T, typename OutT, typename Tiling, typename E, typename Params>
__global__ void __launch_bounds__(Tiling::threads, 1) tiled_kernel(const __grid_constant__ Params p) {
  const int64_t row0 = int64_t(blockIdx.y) * Tiling::bm;
  const int64_t col0 = int64_t(blockIdx.x) * Tiling::bn;
  if (!p.block_active()) {   // (uniform over the block: before any barrier)
    p.template clear_tile<OutT, Tiling>(row0, col0);
    return;
  }
  const auto a = p.template loader_a<Tiling>();
  const auto b = p.template loader_b<Tiling>();
  int64_t first_tile, tiles;
  p.template k_tile_range<Tiling>((p.k + Tiling::bk - 1) / Tiling::bk, first_tile, tiles);
  Accumulators<Tiling, E> acc;
  main_loop<T, Tiling>(acc, a, b, row0, col0, first_tile, tiles);
  if constexpr (std::is_same_v<OutT, E>) {
    p.epilogue.store_raw(acc, row0, col0);
  } else if (p.partial) {
    p.epilogue.store_partial(acc, row0, col0, p.partial + int64_t(blockIdx.z) * p.m * p.n);
  } else {
    p.template store_tile<OutT>(acc, row0, col0, p.out_offset());
  }
}

// Split-K's second half: each thread adds the ranges' partial sums of one column pair.
constexpr int kReduceThreads = 256;

template <typename OutT, typename Params>
__global__ void __launch_bounds__(kReduceThreads) split_k_reduce_kernel(const __grid_constant__ Params p, int splits) {
  const int64_t pair = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (p.epilogue.out_is_f32) p.epilogue.template reduce_pair<float>(p.partial, splits, pair);
  else p.epilogue.template reduce_pair<OutT>(p.partial, splits, pair);
}

// Launches tiled_kernel over (n / bn, m / bm, splits or groups) blocks, then the reduce when K is split
// (`split.splits` > 1: `params.partial` must hold splits * m * n floats). `groups` > 1: that many
// independent problems over blockIdx.z (the family's k_tile_range and out_offset tell them apart).
template <typename T, typename OutT, typename Tiling, typename E, typename Params>
void launch_tiled(const char* name, const char* reduce_name, Params params, SplitK split, DeviceStream stream,
                  int64_t groups = 1) {
  using LoaderA = decltype(params.template loader_a<Tiling>());
  using LoaderB = decltype(params.template loader_b<Tiling>());
  const int64_t k_tiles = (params.k + Tiling::bk - 1) / Tiling::bk;
  const int splits = split.splits;
  params.tiles_per_split = splits > 1 ? split.tiles_per_split : k_tiles;
  if (splits <= 1) params.partial = nullptr;
  const int64_t row_tiles = (params.m + Tiling::bm - 1) / Tiling::bm;
  const int64_t col_tiles = (params.n + Tiling::bn - 1) / Tiling::bn;
  LLMK_CHECK(row_tiles <= 65535, ValueError, name, ": m = ", params.m, " needs more than 65535 row tiles of ",
             Tiling::bm);
  LLMK_CHECK(groups >= 1 && groups <= 65535 && (groups == 1 || splits <= 1), ValueError, name, ": ", groups,
             " groups (at most 65535, and no split-K with groups)");
  constexpr bool can_split = Params::split_k && !std::is_same_v<OutT, E>;   // (raw accumulators: never split)
  LLMK_CHECK(can_split || splits <= 1, ValueError, name, ": this kernel's K is never split");
  launch(name, tiled_kernel<T, OutT, Tiling, E, Params>,
         LaunchShape{dim3(uint32_t(col_tiles), uint32_t(row_tiles), uint32_t(splits > 1 ? splits : groups)),
                     dim3(Tiling::threads),
                     size_t(Tiling::stages) * stage_bytes_of<LoaderA, LoaderB>()},
         stream, params);
  if constexpr (can_split) {
    if (splits > 1) {
      const int64_t pairs = params.m * params.n / 2;
      launch(reduce_name, split_k_reduce_kernel<OutT, Params>,
             LaunchShape{dim3(uint32_t((pairs + kReduceThreads - 1) / kReduceThreads)), dim3(kReduceThreads)},
             stream, params, splits);
    }
  }
}

// The tiling for an (m, n) problem: Small while m fits its rows (K split as `split` says), Large when
// it gives at least one tile per SM, Medium otherwise.
constexpr int64_t kGpuSms = 132;  // H100 SXM; only the tiling choice depends on it

struct SizedTiling {
  int which;    // 0 small, 1 medium, 2 large
  int64_t bm;   // its rows per tile
};
template <typename Small, typename Medium, typename Large>
SizedTiling sized_tiling(int64_t m, int64_t n) {
  const int64_t large_tiles = ((m + Large::bm - 1) / Large::bm) * ((n + Large::bn - 1) / Large::bn);
  if (m <= Small::bm) return {0, Small::bm};
  if (large_tiles >= kGpuSms) return {2, Large::bm};
  return {1, Medium::bm};
}

template <typename T, typename OutT, typename E, typename Small, typename Medium, typename Large, typename Params>
void launch_sized(const char* name, const char* reduce_name, const Params& params, SplitK split, DeviceStream stream) {
  const int which = sized_tiling<Small, Medium, Large>(params.m, params.n).which;
  if (which == 0) launch_tiled<T, OutT, Small, E>(name, reduce_name, params, split, stream);
  else if (which == 2) launch_tiled<T, OutT, Large, E>(name, reduce_name, params, SplitK{}, stream);
  else launch_tiled<T, OutT, Medium, E>(name, reduce_name, params, SplitK{}, stream);
}

}  // namespace llmk::gemm
