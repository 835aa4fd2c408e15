// CUDA kernels of the LoRA family (lora.h). Compiled by nvcc for the GPU and by the host compiler for
// the emulator (docs/emulator.md).
//
// Forward (any adapters and slices), two launches of the GEMM core's tiled kernel, after a small one
// that lists each row tile's adapters when rows pick them (adapter_ids):
//   shrink  s (M, S r) = scale (x_lora Aᵀ) per row's adapter: 64 x 32 tiles; a block's k loop runs K
//           once per adapter its rows use, reading only those rows of x (the others zero-filled) and
//           that adapter's A; its epilogue the (adapter, slice) scale and the rounding;
//   fused   out = x Wᵀ + Σ over the block's (adapter, slice) groups of s_group B_groupᵀ + bias: the base
//           GEMM's k tiles, then ceil(r / bk) more per group, whose A tile is s's slice columns on the
//           group adapter's rows and whose B tile is that adapter's B on the slice's output rows
//           (columns past the adapter's rank zero-filled, never read). At decode a block's rows use a
//           few adapters (BGMV-like: each adapter's B is read once per column tile); at large M the
//           Python layer passes a row order sorted by adapter (segment-like: a row tile holds one or
//           two adapters; x's rows gathered, out's scattered through it). The core's tilings, split-K
//           at small M, bias.
// Transposed (dx = dy W + (scale dy B) A, one adapter): the same two kernels with every weight read
// k-major, the expand laid after the base k tiles (ConcatTileLoader).
#include <type_traits>

#include "core/dispatch.h"
#include "gemm/core.cuh"
#include "lora/lora.h"
#include "quant/int4_loader.cuh"

namespace llmk::lora {
namespace {

using ShrinkTiling = gemm::Tiling<64, 32, 32, 2, 1, 4>;

// Copies columns [k0, k0 + bk) of Rows rows of a row-major matrix into a swizzled tile (Tiling's row
// layout): tile row r is matrix row row_of(r) (negative: zeros); columns at or past k_end are zeros (a
// chunk across k_end copies only what is before it: ranks that are not multiples of 8; nothing past
// k_end is read).
template <typename T, typename Tiling, int Rows, typename RowOf>
LLMK_DEVICE void load_rows(uint8_t* tile, const T* base, int64_t ld, int64_t k0, int64_t k_end, const RowOf& row_of,
                           int thread) {
  constexpr int chunks_per_row = Tiling::row_bytes / 16;
  constexpr int chunks = Rows * chunks_per_row;
  static_assert(chunks % Tiling::threads == 0, "every thread copies the same number of chunks");
  constexpr SwizzledTile layout = Tiling::layout();
#pragma unroll
  for (int c = thread; c < chunks; c += Tiling::threads) {
    const int r = c / chunks_per_row, chunk = c % chunks_per_row;
    const int64_t column = k0 + 8 * chunk, left = k_end - column;
    const int64_t row = left > 0 ? row_of(r) : -1;
    const int bytes = row < 0 ? 0 : left >= 8 ? 16 : int(2 * left);
    cp_async<16>(tile + layout.offset(r, 16 * chunk), bytes ? base + row * ld + column : base, bytes);
  }
}

// The adapters of a block's row tile: adapter_tiles_kernel's list (ascending, distinct), or adapter 0
// for every row without adapter ids.
struct BlockAdapters {
  const int32_t* ids;    // (M), or null
  const int32_t* list;
  int64_t count;
  LLMK_DEVICE int32_t adapter(int64_t i) const { return ids ? load_global(list + i) : 0; }
  LLMK_DEVICE bool uses(int64_t row, int32_t adapter) const { return !ids || load_global(ids + row) == adapter; }
};

// The tile lists (lora.h: tiles_size): for row tiles of R rows, tile t's record is [count, adapters...]
// of cap + 1 int32 at t (cap + 1), cap = min(R, L). Two layouts one after the other: the shrink's (R =
// ShrinkTiling::bm) and the fused kernel's (R = its tiling's bm).
LLMK_HD int64_t tile_cap(int64_t rows, int64_t adapters) { return rows < adapters ? rows : adapters; }
static_assert(kShrinkTileRows == ShrinkTiling::bm && kFusedTileRows[0] == gemm::SmallTiling::bm &&
                  kFusedTileRows[1] == gemm::MediumTiling::bm && kFusedTileRows[2] == gemm::LargeTiling::bm &&
                  quant::Int4Small::bm == gemm::SmallTiling::bm && quant::Int4Medium::bm == gemm::MediumTiling::bm &&
                  quant::Int4Large::bm == gemm::LargeTiling::bm && quant::Int4Small::bk == gemm::kSplitTileK,
              "lora.h's tile rows are the tilings' (the int4 base's too), split-K's tiles the small ones'");

LLMK_DEVICE BlockAdapters block_adapters(const Problem& p, const int32_t* layout, int64_t rows) {
  if (!p.adapter_ids) return {nullptr, nullptr, 1};
  const int32_t* record = layout + int64_t(blockIdx.y) * (tile_cap(rows, p.adapters) + 1);
  return {p.adapter_ids, record + 1, int64_t(load_global(record))};
}

constexpr int kTileThreads = 128;   // >= every tiling's bm

struct TilesParams {
  const int32_t* ids;
  int64_t m, adapters;
  int64_t rows[2], tiles[2];
  int32_t* out[2];
};

// One block per row tile of either layout: the distinct adapter ids in [0, L) of its rows, ascending.
__global__ void __launch_bounds__(kTileThreads) adapter_tiles_kernel(const __grid_constant__ TilesParams p) {
  const int layout = int64_t(blockIdx.x) < p.tiles[0] ? 0 : 1;
  const int64_t tile = int64_t(blockIdx.x) - (layout ? p.tiles[0] : 0), rows = p.rows[layout];
  int32_t* ids = reinterpret_cast<int32_t*>(dynamic_shared_memory());
  int32_t* first = ids + kTileThreads;
  const int i = int(threadIdx.x);
  const int64_t row = tile * rows + i;
  int32_t id = i < rows && row < p.m ? load_global(p.ids + row) : -1;
  if (id < 0 || id >= p.adapters) id = -1;
  ids[i] = id;
  __syncthreads();
  bool is_first = id >= 0;
  for (int j = 0; j < i; ++j) is_first = is_first && ids[j] != id;
  first[i] = is_first;
  __syncthreads();
  int32_t* record = p.out[layout] + tile * (tile_cap(rows, p.adapters) + 1);
  if (is_first) {
    int position = 0;
    for (int j = 0; j < kTileThreads; ++j) position += first[j] && ids[j] < id;
    store_global(record + 1 + position, id);
  }
  if (i == 0) {
    int32_t count = 0;
    for (int j = 0; j < kTileThreads; ++j) count += first[j];
    store_global(record, count);
  }
}

// -- the forward ----------------------------------------------------------------------------------

template <typename T>
struct LoraParams : gemm::TiledParams {
  Problem lora;
  const int32_t* tiles;   // this kernel's layout of the adapter lists
};

// What both shrink loaders know of the block: its rows' adapters, each running K (padded to bk).
struct ShrinkBlock {
  const Problem* lora;
  int64_t k_padded;
  BlockAdapters adapters;
};

// The shrink's A: x_lora's rows of k tile k0's adapter (K once per adapter of the block).
template <typename T, typename Tiling>
struct ShrinkLoaderA : gemm::RowTileLoader<T, Tiling, Tiling::bm> {
  ShrinkBlock block;
  LLMK_DEVICE void load(uint8_t* tile, int64_t row0, int64_t k0, int thread) const {
    const Problem& p = *block.lora;
    const int64_t group = k0 / block.k_padded;
    const int32_t adapter = block.adapters.adapter(group);
    load_rows<T, Tiling, Tiling::bm>(tile, static_cast<const T*>(p.x_lora), p.ld_lora, k0 - group * block.k_padded,
                                     p.in_features, [&](int r) {
      const int64_t row = row0 + r;
      return row < p.m && block.adapters.uses(row, adapter) ? p.x_row(row) : int64_t(-1);
    }, thread);
  }
};

// The shrink's B: output column c = (slice c / r, j = c % r) is A[adapter, slice, j], zero past the
// adapter's rank.
template <typename T, typename Tiling>
struct ShrinkLoaderB : gemm::RowTileLoader<T, Tiling, Tiling::bn> {
  ShrinkBlock block;
  LLMK_DEVICE void load(uint8_t* tile, int64_t col0, int64_t k0, int thread) const {
    const Problem& p = *block.lora;
    const int64_t group = k0 / block.k_padded, columns = p.slices * p.rank;
    const int32_t adapter = block.adapters.adapter(group), rank = p.rank_of(adapter);
    load_rows<T, Tiling, Tiling::bn>(tile, static_cast<const T*>(p.lora_a), p.in_features, k0 - group * block.k_padded,
                                     p.in_features, [&](int r) {
      const int64_t c = col0 + r;
      return c < columns && c % p.rank < rank ? adapter * columns + c : int64_t(-1);
    }, thread);
  }
};

template <typename T>
struct ShrinkParams : LoraParams<T> {
  static constexpr bool split_k = false;
  template <typename Tiling>
  LLMK_DEVICE ShrinkBlock block() const {
    return {&this->lora, round_up(this->lora.in_features, int64_t(Tiling::bk)),
            block_adapters(this->lora, this->tiles, Tiling::bm)};
  }
  template <typename Tiling>
  LLMK_DEVICE ShrinkLoaderA<T, Tiling> loader_a() const {
    ShrinkLoaderA<T, Tiling> loader{};
    loader.block = block<Tiling>();
    return loader;
  }
  template <typename Tiling>
  LLMK_DEVICE ShrinkLoaderB<T, Tiling> loader_b() const {
    ShrinkLoaderB<T, Tiling> loader{};
    loader.block = block<Tiling>();
    return loader;
  }
  // K's tiles once per adapter of the block's rows.
  template <typename Tiling>
  LLMK_DEVICE void k_tile_range(int64_t k_tiles, int64_t& first, int64_t& count) const {
    first = 0;
    count = k_tiles * block<Tiling>().adapters.count;
  }
  template <typename OutT, typename Tiling, typename E>
  LLMK_DEVICE void store_tile(const gemm::Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0, int64_t) const {
    const Problem& p = this->lora;
    const int64_t ld = p.slices * p.rank;
    this->epilogue.for_each_pair(acc, row0, col0, [&](int64_t row, int64_t col, float v0, float v1) {
      const int32_t adapter = p.adapter_ids ? load_global(p.adapter_ids + row) : 0;
      const float scale = adapter >= 0 && adapter < p.adapters ? p.scale_of(adapter, col / p.rank) : 0.0f;
      store_global(reinterpret_cast<Vec<T, 2>*>(static_cast<T*>(p.shrink) + row * ld + col),
                   Vec<T, 2>{{from_float<T>(scale * v0), from_float<T>(scale * v1)}});
    });
  }
};

// The block's expand groups: (its adapters) x (the slices its columns meet), ceil(r / bk) k tiles each.
struct Groups {
  const Problem* lora;
  BlockAdapters adapters;
  int64_t first_slice, slices, k_padded, group_k;   // group_k: r rounded up to bk
  LLMK_DEVICE int64_t count() const { return adapters.count * slices; }
};

template <typename Tiling>
LLMK_DEVICE Groups block_groups(const Problem& p, const int32_t* tiles) {
  const int64_t col0 = int64_t(blockIdx.x) * Tiling::bn;
  const int64_t last = (col0 + Tiling::bn < p.out_features ? col0 + Tiling::bn : p.out_features) - 1;
  const int64_t first_slice = p.slice_of(col0);
  return {&p, block_adapters(p, tiles, Tiling::bm), first_slice, p.slice_of(last) - first_slice + 1,
          round_up(p.in_features, int64_t(Tiling::bk)), round_up(p.rank, int64_t(Tiling::bk))};
}

// The fused kernel's A: x for the base k tiles, then per group s's slice columns on the group
// adapter's rows.
template <typename T, typename Tiling>
struct FusedLoaderA : gemm::RowTileLoader<T, Tiling, Tiling::bm> {
  Groups groups;
  LLMK_DEVICE void load(uint8_t* tile, int64_t row0, int64_t k0, int thread) const {
    const Problem& p = *groups.lora;
    if (k0 < groups.k_padded) {
      load_rows<T, Tiling, Tiling::bm>(tile, static_cast<const T*>(p.x), p.ldx, k0, p.in_features, [&](int r) {
        return row0 + r < p.m ? p.x_row(row0 + r) : int64_t(-1);
      }, thread);
      return;
    }
    const int64_t e = k0 - groups.k_padded, group = e / groups.group_k;
    const int64_t i = group / groups.slices, slice = groups.first_slice + group % groups.slices;
    const int32_t adapter = groups.adapters.adapter(i);
    load_rows<T, Tiling, Tiling::bm>(tile, static_cast<const T*>(p.shrink) + slice * p.rank, p.slices * p.rank,
                                     e - group * groups.group_k, p.rank, [&](int r) {
      const int64_t row = row0 + r;
      return row < p.m && groups.adapters.uses(row, adapter) ? row : int64_t(-1);
    }, thread);
  }
};

// The fused kernel's B: W's rows (Base: a 16-bit row loader), then per group the adapter's B on the
// slice's output rows, its columns up to the adapter's rank.
template <typename T, typename Tiling>
struct FusedLoaderB : gemm::RowTileLoader<T, Tiling, Tiling::bn> {
  Groups groups;
  LLMK_DEVICE void load(uint8_t* tile, int64_t col0, int64_t k0, int thread) const {
    const Problem& p = *groups.lora;
    if (k0 < groups.k_padded) {
      load_rows<T, Tiling, Tiling::bn>(tile, static_cast<const T*>(p.weight), p.in_features, k0, p.in_features,
                                       [&](int r) { return col0 + r < p.out_features ? col0 + r : int64_t(-1); },
                                       thread);
      return;
    }
    const int64_t e = k0 - groups.k_padded, group = e / groups.group_k;
    const int64_t i = group / groups.slices, slice = groups.first_slice + group % groups.slices;
    const int32_t adapter = groups.adapters.adapter(i);
    const int64_t lo = p.slice_offsets[slice], hi = p.slice_offsets[slice + 1];
    load_rows<T, Tiling, Tiling::bn>(tile, static_cast<const T*>(p.lora_b) + adapter * p.out_features * p.rank,
                                     p.rank, e - group * groups.group_k, p.rank_of(adapter), [&](int r) {
      const int64_t n = col0 + r;
      return n >= lo && n < hi ? n : int64_t(-1);
    }, thread);
  }
};

// With an int4 base weight: the quantized GEMM's dequantizing loader for the base k tiles, 16-bit rows
// for the groups'; two tile layouts, so the main loop takes each k tile's fragments from `first`
// (int4) or `second` (rows) (core.cuh: is_segmented).
template <typename T, typename Tiling>
struct FusedInt4LoaderB {
  using Rows = gemm::RowTileLoader<T, Tiling, Tiling::bn>;
  using Int4 = quant::Int4TileLoader<T, Tiling>;
  static constexpr bool segmented = true;
  static constexpr int bytes = Int4::bytes > Rows::bytes ? Int4::bytes : Rows::bytes;
  Int4 first;
  Rows second;   // (its fragments only)
  int64_t split;
  FusedLoaderB<T, Tiling> adapters;
  LLMK_DEVICE void load(uint8_t* tile, int64_t col0, int64_t k0, int thread) const {
    if (k0 < split) first.load(tile, col0, k0, thread);
    else adapters.load(tile, col0, k0, thread);
  }
};

template <typename T, bool Int4>
struct FusedParams : LoraParams<T> {
  template <typename Tiling>
  LLMK_DEVICE FusedLoaderA<T, Tiling> loader_a() const {
    FusedLoaderA<T, Tiling> loader{};
    loader.groups = block_groups<Tiling>(this->lora, this->tiles);
    return loader;
  }
  template <typename Tiling>
  using LoaderB = std::conditional_t<Int4, FusedInt4LoaderB<T, Tiling>, FusedLoaderB<T, Tiling>>;
  template <typename Tiling>
  LLMK_DEVICE LoaderB<Tiling> loader_b() const {
    FusedLoaderB<T, Tiling> loader{};
    loader.groups = block_groups<Tiling>(this->lora, this->tiles);
    if constexpr (Int4) {
      const Problem& p = this->lora;
      FusedInt4LoaderB<T, Tiling> int4{};
      int4.first = {static_cast<const int32_t*>(p.weight), static_cast<const T*>(p.w_scales), p.w_zeros,
                    p.out_features, quant::int4_k_blocks(p.in_features), p.group_size};
      int4.split = loader.groups.k_padded;
      int4.adapters = loader;
      return int4;
    } else {
      return loader;
    }
  }
  // Rows in row_order: each stored at its x row (no split-K then: lora.cpp).
  template <typename OutT, typename Tiling, typename E>
  LLMK_DEVICE void store_tile(const gemm::Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0, int64_t) const {
    const Problem& p = this->lora;
    if (!p.row_order) {
      this->epilogue.template store<OutT>(acc, row0, col0);
      return;
    }
    this->epilogue.for_each_pair(acc, row0, col0, [&](int64_t row, int64_t col, float v0, float v1) {
      const int64_t x_row = p.x_row(row);
      if (x_row >= 0) this->epilogue.template store_pair<OutT>(x_row, col, v0, v1);
    });
  }
  // The base's k tiles and the block's groups', split into blockIdx.z's range (split-K plans over an
  // upper bound of the groups: a range past this block's tiles runs none and stores zeros).
  template <typename Tiling>
  LLMK_DEVICE void k_tile_range(int64_t, int64_t& first, int64_t& count) const {
    const Groups groups = block_groups<Tiling>(this->lora, this->tiles);
    const int64_t total = (groups.k_padded + groups.count() * groups.group_k) / Tiling::bk;
    first = int64_t(blockIdx.z) * this->tiles_per_split;
    count = (first + this->tiles_per_split < total ? first + this->tiles_per_split : total) - first;
  }
};

// -- the transposed product (the backward's dx, one adapter) -------------------------------------

template <typename T, typename Tiling, int Cols>
using KMajor = gemm::KMajorTileLoader<T, Tiling, Cols>;

template <typename T>
struct TransposedShrinkParams : gemm::TiledParams {   // u = scale dy B, (M, r)
  const T* dy;
  int64_t ldy;
  const T* lora_b;   // (N, r): k-major for the product over N
  T* shrink;
  int64_t rank;
  float scale;
  static constexpr bool split_k = false;
  template <typename Tiling>
  LLMK_DEVICE gemm::RowTileLoader<T, Tiling, Tiling::bm> loader_a() const { return {dy, ldy, m, k, nullptr}; }
  template <typename Tiling>
  LLMK_DEVICE KMajor<T, Tiling, Tiling::bn> loader_b() const { return {lora_b, rank, rank, k}; }
  template <typename OutT, typename Tiling, typename E>
  LLMK_DEVICE void store_tile(const gemm::Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0, int64_t) const {
    epilogue.for_each_pair(acc, row0, col0, [&](int64_t row, int64_t col, float v0, float v1) {
      store_global(reinterpret_cast<Vec<T, 2>*>(shrink + row * rank + col),
                   Vec<T, 2>{{from_float<T>(scale * v0), from_float<T>(scale * v1)}});
    });
  }
};

template <typename T>
struct TransposedFusedParams : gemm::TiledParams {   // dx = [dy | u] · [W ; A] (k-major)
  const T* dy;
  int64_t ldy, in_features;   // N
  const T* weight;
  const T* shrink;
  int64_t rank;
  const T* lora_a;
  template <typename Tiling>
  using LoaderA = gemm::ConcatTileLoader<gemm::RowTileLoader<T, Tiling, Tiling::bm>, Tiling>;
  template <typename Tiling>
  using LoaderB = gemm::ConcatTileLoader<KMajor<T, Tiling, Tiling::bn>, Tiling>;
  template <typename Tiling>
  LLMK_DEVICE LoaderA<Tiling> loader_a() const {
    return {{dy, ldy, m, in_features, nullptr}, {shrink, rank, m, rank, nullptr}, padded(in_features)};
  }
  template <typename Tiling>
  LLMK_DEVICE LoaderB<Tiling> loader_b() const {
    return {{weight, n, n, in_features}, {lora_a, n, n, rank}, padded(in_features)};
  }
};

constexpr int kDropoutThreads = 256;

// One thread per group of 4 elements (one Philox call), 8-byte loads and stores.
template <typename T>
__global__ void __launch_bounds__(kDropoutThreads) dropout_kernel(const __grid_constant__ DropoutProblem p) {
  const int64_t g = int64_t(blockIdx.x) * kDropoutThreads + threadIdx.x;
  if (g >= p.m * p.k / 4) return;
  const Philox4 words = dropout_words(p.seed, uint64_t(g));
  const int64_t row = 4 * g / p.k, col = 4 * g % p.k;
  const Vec<T, 4> x = load_global(reinterpret_cast<const Vec<T, 4>*>(static_cast<const T*>(p.x) + row * p.ldx + col));
  Vec<T, 4> out;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    out[q] = from_float<T>(words.x[q] >= p.threshold ? to_float(x[q]) * p.keep_scale : 0.0f);
  store_global(reinterpret_cast<Vec<T, 4>*>(static_cast<T*>(p.out) + 4 * g), out);
}

gemm::Epilogue plain_epilogue(void* out, int64_t m, int64_t n, const float* bias) {
  return gemm::Epilogue{out, n, false, bias, nullptr, nullptr, gemm::Activation::none, false, m, n};
}

template <typename T>
void forward(const Problem& p, DeviceStream stream) {
  int32_t* fused_tiles = nullptr;
  if (p.adapter_ids) {
    TilesParams tiles{p.adapter_ids, p.m, p.adapters, {ShrinkTiling::bm, p.int4 ? gemm::sized_tiling<quant::Int4Small, quant::Int4Medium, quant::Int4Large>(p.m, p.out_features).bm
                                  : gemm::sized_tiling<gemm::SmallTiling, gemm::MediumTiling, gemm::LargeTiling>(p.m, p.out_features).bm}, {},
                      {p.tiles, nullptr}};
    for (int l = 0; l < 2; ++l) tiles.tiles[l] = (p.m + tiles.rows[l] - 1) / tiles.rows[l];
    fused_tiles = tiles.out[1] = p.tiles + tiles_size(p.m, tiles.rows[0], p.adapters);
    launch("lora adapter tiles", adapter_tiles_kernel,
           LaunchShape{dim3(uint32_t(tiles.tiles[0] + tiles.tiles[1])), dim3(kTileThreads),
                       2 * kTileThreads * sizeof(int32_t)},
           stream, tiles);
  }
  ShrinkParams<T> shrink{};
  static_cast<gemm::TiledParams&>(shrink) = gemm::TiledParams{
      p.m, p.slices * p.rank, p.in_features, plain_epilogue(p.shrink, p.m, p.slices * p.rank, nullptr), nullptr, 0};
  shrink.lora = p;
  shrink.tiles = p.tiles;
  gemm::launch_tiled<T, T, ShrinkTiling, float>("lora shrink", "", shrink, gemm::SplitK{}, stream);

  // (k: an upper bound of a block's tiles, for split-K's plan: the base and min(M, L) adapters' groups)
  const int64_t k_bound = fused_k_bound(p.m, p.in_features, p.rank, p.adapters, p.slices, p.adapter_ids != nullptr);
  const gemm::SplitK split = gemm::split_k(p.m, p.out_features, k_bound);
  LLMK_CHECK(split.splits == 1 || p.workspace, ValueError, "lora_linear: split-K needs a workspace");
  LLMK_CHECK(split.splits == 1 || !p.row_order, ValueError, "lora_linear: row_order with split-K");
  auto run = [&](auto int4) {
    FusedParams<T, decltype(int4)::value> fused{};
    static_cast<gemm::TiledParams&>(fused) = gemm::TiledParams{
        p.m, p.out_features, k_bound, plain_epilogue(p.out, p.m, p.out_features, p.bias), p.workspace, 0};
    fused.lora = p;
    fused.tiles = fused_tiles;
    if constexpr (decltype(int4)::value)
      gemm::launch_sized<T, T, float, quant::Int4Small, quant::Int4Medium, quant::Int4Large>(
          "lora fused (int4 base)", "lora fused (int4 base) split-k reduce", fused, split, stream);
    else
      gemm::launch_sized<T, T, float, gemm::SmallTiling, gemm::MediumTiling, gemm::LargeTiling>(
          "lora fused", "lora fused split-k reduce", fused, split, stream);
  };
  if (p.int4) run(std::true_type{});
  else run(std::false_type{});
}

template <typename T>
void transposed(const Problem& p, DeviceStream stream) {
  TransposedShrinkParams<T> shrink{};
  static_cast<gemm::TiledParams&>(shrink) = gemm::TiledParams{
      p.m, p.rank, p.in_features, plain_epilogue(p.shrink, p.m, p.rank, nullptr), nullptr, 0};
  shrink.dy = static_cast<const T*>(p.x);
  shrink.ldy = p.ldx;
  shrink.lora_b = static_cast<const T*>(p.lora_b);
  shrink.shrink = static_cast<T*>(p.shrink);
  shrink.rank = p.rank;
  shrink.scale = p.scale;
  gemm::launch_tiled<T, T, ShrinkTiling, float>("lora shrink (transposed)", "", shrink, gemm::SplitK{}, stream);

  const int64_t k_total = padded(p.in_features) + p.rank;   // (split-K plans over lora_workspace's bound)
  const gemm::SplitK split = gemm::split_k(p.m, p.out_features, fused_k_bound(p.m, p.in_features, p.rank, 1, 1, false));
  LLMK_CHECK(split.splits == 1 || p.workspace, ValueError, "lora_linear: split-K needs a workspace");
  TransposedFusedParams<T> fused{};
  static_cast<gemm::TiledParams&>(fused) = gemm::TiledParams{
      p.m, p.out_features, k_total, plain_epilogue(p.out, p.m, p.out_features, nullptr), p.workspace, 0};
  fused.dy = static_cast<const T*>(p.x);
  fused.ldy = p.ldx;
  fused.in_features = p.in_features;
  fused.weight = static_cast<const T*>(p.weight);
  fused.shrink = static_cast<const T*>(p.shrink);
  fused.rank = p.rank;
  fused.lora_a = static_cast<const T*>(p.lora_a);
  gemm::launch_sized<T, T, float, gemm::SmallTiling, gemm::MediumTiling, gemm::LargeTiling>(
      "lora fused (transposed)", "lora fused (transposed) split-k reduce", fused, split, stream);
}

}  // namespace

void dropout_device(const DropoutProblem& p, DeviceStream stream) {
  const int64_t blocks = (p.m * p.k / 4 + kDropoutThreads - 1) / kDropoutThreads;
  LLMK_CHECK(blocks < (int64_t(1) << 31), ValueError, "dropout: ", p.m, " x ", p.k, " is too large for one launch");
  dispatch<bf16, f16>(p.dtype, "dropout (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch("lora dropout", dropout_kernel<T>, LaunchShape{dim3(uint32_t(blocks)), dim3(kDropoutThreads)}, stream, p);
  });
}

void lora_linear_device(const Problem& p, DeviceStream stream) {
  static_assert(kSegment % gemm::LargeTiling::bk == 0 && kSegment % gemm::SmallTiling::bk == 0 &&
                    kSegment % ShrinkTiling::bk == 0 && kSegment % quant::Int4Large::bk == 0,
                "the transposed product's expand starts on a k tile of every tiling");
  dispatch<bf16, f16>(p.dtype, "lora_linear (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.transposed) transposed<T>(p, stream);
    else forward<T>(p, stream);
  });
}

}  // namespace llmk::lora
