// CUDA kernels of the Mixture-of-Experts family (moe.h). Compiled by nvcc for the GPU and by the host
// compiler for the emulator (docs/emulator.md).
//
// route: one warp per token, 8 tokens a block. Lane l holds experts l, l + 32, ... (at most 32 each:
// E <= 1024) in registers; the max and the sum of exponentials are warp reductions; each of the k
// picks is a warp arg-max over the lanes' best untaken experts (moe/route_select.h's order), and the
// per-expert counts are integer atomics (exact, whatever the order).
#include <cmath>
#include <type_traits>

#include "common/device.h"
#include "common/float_types.h"
#include "common/launch.h"
#include "common/vector_io.h"
#include "common/warp_reduce.h"
#include "core/dispatch.h"
#include "gemm/core.cuh"
#include "moe/moe.h"
#include "moe/route_select.h"

namespace llmk::moe {
namespace {

constexpr int kRouteWarps = 8;
constexpr int kPerLane = int(kMaxExperts / 32);

template <typename T>
__global__ void __launch_bounds__(32 * kRouteWarps) route_kernel(const __grid_constant__ RouteProblem p) {
  const int lane = int(threadIdx.x % 32);
  const int64_t t = int64_t(blockIdx.x) * kRouteWarps + threadIdx.x / 32;
  if (t >= p.tokens) return;   // whole warps
  const T* logits = static_cast<const T*>(p.logits) + t * p.ld;
  const int experts = int(p.experts);
  float values[kPerLane];
  float max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    values[i] = e < experts ? to_float(load_global(logits + e)) : NAN;
    if (e < experts) max = values[i] > max ? values[i] : max;
  }
  max = warp_max(max);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    if (lane + 32 * i < experts) sum += expf(values[i] - max);
  sum = warp_sum(sum);
  if (lane == 0) store_global(p.logsumexp + t, max + logf(sum));
  uint32_t taken = 0;   // bit i: expert lane + 32 i
  float total = 0.0f;
  for (int j = 0; j < int(p.top_k); ++j) {
    float best = NAN;
    int best_expert = -1;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < experts && !(taken >> i & 1u) && (best_expert < 0 || ranks_before(values[i], e, best, best_expert))) {
        best = values[i];
        best_expert = e;
      }
    }
    // the warp's arg-max in the same order (a lane with nothing left offers index -1: never chosen)
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_expert = __shfl_xor_sync(0xffffffffu, best_expert, offset);
      if (other_expert >= 0 && (best_expert < 0 || ranks_before(other, other_expert, best, best_expert))) {
        best = other;
        best_expert = other_expert;
      }
    }
    if (best_expert % 32 == lane) taken |= 1u << (best_expert / 32);
    const float score = route_score(best, max, sum, p.scoring == Scoring::sigmoid);
    total += score;
    if (lane == 0 && best_expert >= 0) {   // (always: the order is total and k <= E)
      store_global(p.expert_ids + t * p.top_k + j, int32_t(best_expert));
      store_global(p.weights + t * p.top_k + j, score);
      atomicAdd(p.tokens_per_expert + best_expert, 1);
    }
  }
  if (p.renormalize) {
    __syncwarp();   // lane 0's weights visible to the warp; every lane knows the total
    for (int j = lane; j < int(p.top_k); j += 32) {
      float* w = p.weights + t * p.top_k + j;
      store_global(w, load_global(w) / total);
    }
  }
}

constexpr int kZeroThreads = 256;

__global__ void __launch_bounds__(kZeroThreads) zero_counts_kernel(int32_t* counts, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * kZeroThreads + threadIdx.x;
  if (i < n) store_global(counts + i, 0);
}

// permute, four launches (moe.h): per chunk of kPermuteChunk pairs, its per-expert counts (shared
// atomics: counts do not depend on the order); per expert, the chunks' exclusive prefix (in place) and
// its total, and the padded offsets; per chunk, each pair's rank among the chunk's earlier pairs of
// its expert (within a warp by shuffles, across warps by per-warp counts in shared memory), so its row
// is offset + chunk prefix + rank: stable, deterministic, no sort; per row, padding and block experts.
constexpr int kPermuteThreads = int(kPermuteChunk);
constexpr int kPermuteWarps = kPermuteThreads / 32;

__global__ void __launch_bounds__(kPermuteThreads) permute_count_kernel(const __grid_constant__ PermuteProblem p) {
  auto* counts = reinterpret_cast<int32_t*>(dynamic_shared_memory());
  const int thread = int(threadIdx.x);
  for (int e = thread; e < int(p.experts); e += kPermuteThreads) store_shared(counts + e, 0);
  __syncthreads();
  const int64_t pair = int64_t(blockIdx.x) * kPermuteChunk + thread;
  if (pair < p.tokens * p.top_k) {
    const int32_t e = load_global(p.expert_ids + pair);
    if (e >= 0 && e < p.experts) atomicAdd(counts + e, 1);
  }
  __syncthreads();
  for (int e = thread; e < int(p.experts); e += kPermuteThreads)
    store_global(p.workspace + int64_t(blockIdx.x) * p.experts + e, load_shared(counts + e));
}

// One block of kMaxExperts threads: thread e owns expert e.
__global__ void __launch_bounds__(kMaxExperts) permute_offsets_kernel(const __grid_constant__ PermuteProblem p,
                                                                      int64_t chunks) {
  auto* padded = reinterpret_cast<int32_t*>(dynamic_shared_memory());
  const int e = int(threadIdx.x);
  if (e < p.experts) {
    int32_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t* count = p.workspace + c * p.experts + e;
      const int32_t v = load_global(count);
      store_global(count, running);
      running += v;
    }
    store_global(p.workspace + chunks * p.experts + e, running);   // the expert's total
    store_shared(padded + e, int32_t((running + p.block - 1) / p.block * p.block));
  }
  __syncthreads();
  if (e == 0) {   // (E <= 1024 additions)
    int32_t offset = 0;
    for (int i = 0; i < int(p.experts); ++i) {
      store_global(p.expert_offsets + i, offset);
      offset += load_shared(padded + i);
    }
    store_global(p.expert_offsets + p.experts, offset);
  }
}

__global__ void __launch_bounds__(kPermuteThreads) permute_place_kernel(const __grid_constant__ PermuteProblem p) {
  auto* warp_counts = reinterpret_cast<int32_t*>(dynamic_shared_memory());   // [warp][expert]
  const int thread = int(threadIdx.x), lane = thread % 32, warp = thread / 32;
  for (int i = thread; i < kPermuteWarps * int(p.experts); i += kPermuteThreads) store_shared(warp_counts + i, 0);
  __syncthreads();
  const int64_t pair = int64_t(blockIdx.x) * kPermuteChunk + thread;
  const int64_t pairs = p.tokens * p.top_k;
  int32_t e = pair < pairs ? load_global(p.expert_ids + pair) : -1;
  if (e >= p.experts) e = -1;
  int rank = 0;
  bool last = true;   // the warp's last lane with this expert
  for (int j = 0; j < 32; ++j) {
    const int32_t other = __shfl_sync(0xffffffffu, e, j);
    if (other == e && j < lane) ++rank;
    if (other == e && j > lane) last = false;
  }
  if (e >= 0 && last) store_shared(warp_counts + warp * p.experts + e, rank + 1);
  __syncthreads();
  if (pair >= pairs) return;
  if (e < 0) {
    store_global(p.slot_row + pair, -1);
    return;
  }
  for (int w = 0; w < warp; ++w) rank += load_shared(warp_counts + w * p.experts + e);
  const int64_t row = int64_t(load_global(p.expert_offsets + e)) +
                      load_global(p.workspace + int64_t(blockIdx.x) * p.experts + e) + rank;
  store_global(p.row_token + row, int32_t(pair / p.top_k));
  store_global(p.row_slot + row, int32_t(pair % p.top_k));
  store_global(p.slot_row + pair, int32_t(row));
}

__global__ void __launch_bounds__(kPermuteThreads) permute_pad_kernel(const __grid_constant__ PermuteProblem p,
                                                                      int64_t chunks) {
  const int64_t row = int64_t(blockIdx.x) * kPermuteThreads + threadIdx.x;
  if (row >= p.rows) return;
  const int32_t used = load_global(p.expert_offsets + p.experts);
  int lo = 0, hi = int(p.experts);   // the expert e with offsets[e] <= row < offsets[e + 1]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (load_global(p.expert_offsets + mid) <= row) lo = mid;
    else hi = mid;
  }
  const bool real = row < used && row - load_global(p.expert_offsets + lo) < load_global(p.workspace + chunks * p.experts + lo);
  if (!real) {
    store_global(p.row_token + row, -1);
    store_global(p.row_slot + row, -1);
  }
  if (row % p.block == 0) store_global(p.block_expert + row / p.block, row < used ? int32_t(lo) : -1);
}

// Zeros over rows [row0, min(row0 + kMoeBlock, rows)) x columns [first, min(end, ld)) of a row-major
// matrix with rows of ld elements, by the block's threads (an inactive block's tile of an output).
template <typename O>
LLMK_DEVICE void clear_rows(O* out, int64_t ld, int64_t row0, int64_t rows, int64_t first, int64_t end) {
  const int64_t width = (end < ld ? end : ld) - first;
  for (int64_t i = threadIdx.x; i < kMoeBlock * width; i += blockDim.x) {
    const int64_t row = row0 + i / width;
    if (row < rows) store_global(out + row * ld + first + i % width, from_float<O>(0.0f));
  }
}

// grouped_gemm: the GEMM core's tiled kernel with 64-row blocks (the permutation's block), each block's
// B the weight of its expert, (n, k) or k-major (k, n); blocks of expert -1 write zeros over their tile.
using MoeTiling = gemm::Tiling<kMoeBlock, 64, 32, 2, 2, 4>;

template <typename T, bool KMajorB>
struct GroupedParams : gemm::TiledParams {
  const T* a;
  int64_t lda;
  const int32_t* a_rows;
  const T* b;
  const int32_t* block_expert;
  int64_t pair_half;   // swiglu: n / 2 (stacked gate and up read as adjacent pairs), else 0
  T* pre;              // optional: the pre-activation pairs too (moe.h)
  static constexpr bool split_k = false;

  LLMK_DEVICE bool block_active() const { return load_global(block_expert + blockIdx.y) >= 0; }
  // A block past the last expert: zeros over its tile of out (out's columns: n, or n / 2 for swiglu).
  template <typename OutT, typename Tiling>
  LLMK_DEVICE void clear_tile(int64_t row0, int64_t col0) const {
    const int64_t ld = pair_half ? n / 2 : n, first = pair_half ? col0 / 2 : col0;
    const int64_t end = first + (pair_half ? Tiling::bn / 2 : Tiling::bn);
    if (epilogue.out_is_f32) clear_rows(static_cast<float*>(epilogue.out), ld, row0, m, first, end);
    else clear_rows(static_cast<OutT*>(epilogue.out), ld, row0, m, first, end);
    if (pre) clear_rows(pre, n, row0, m, col0, col0 + Tiling::bn);
  }
  // With `pre`: each accumulator pair rounded into it as it stands (a swiglu (gate, up) pair, or two
  // gelu inputs), then the epilogue.
  template <typename OutT, typename Tiling, typename E>
  LLMK_DEVICE void store_tile(const gemm::Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0, int64_t offset) const {
    if (pre)
      epilogue.for_each_pair(acc, row0, col0, [&](int64_t row, int64_t col, float v0, float v1) {
        store_global(reinterpret_cast<Vec<T, 2>*>(pre + row * n + col), Vec<T, 2>{{from_float<T>(v0), from_float<T>(v1)}});
      });
    gemm::TiledParams::store_tile<OutT>(acc, row0, col0, offset);
  }
  template <typename Tiling>
  LLMK_DEVICE gemm::RowTileLoader<T, Tiling, Tiling::bm> loader_a() const { return {a, lda, m, k, a_rows}; }
  template <typename Tiling>
  using LoaderB = std::conditional_t<KMajorB, gemm::KMajorTileLoader<T, Tiling>, gemm::RowTileLoader<T, Tiling, Tiling::bn>>;
  template <typename Tiling>
  LLMK_DEVICE LoaderB<Tiling> loader_b() const {   // (a declared type: nvcc's host pass deduces no device `auto`)
    const T* weight = b + int64_t(load_global(block_expert + blockIdx.y)) * n * k;
    if constexpr (KMajorB) return {weight, n, n, k};
    else return {weight, k, n, k, nullptr, true, pair_half};
  }
};

// down_backward: the grouped GEMM dZ = dout[token] · W_down[e] (k-major weights) with moe.h's
// epilogue instead of the core's: each thread takes its (row, column pair) accumulators, reads the
// two saved (g, u) pairs in one 8-byte load, writes dPre and w h as pairs, and sums dz h over its
// columns; the four lanes of a quad share a row (mma.h's C layout), so two shuffles give the warp's
// part of the row's sum.
template <typename T>
struct DownBackwardParams : GroupedParams<T, true> {
  const T* saved_pre;   // the forward's pre (grouped_gemm's `pre` output)
  const float* row_weight;
  T* dpre;
  T* weighted_h;
  float* dweight_parts;
  bool swiglu;

  template <typename OutT, typename Tiling>
  LLMK_DEVICE void clear_tile(int64_t row0, int64_t col0) const {
    const int64_t ffn = this->n, rows = this->m, end = col0 + Tiling::bn < ffn ? col0 + Tiling::bn : ffn;
    const int64_t part = int64_t(blockIdx.x) * Tiling::warps_n;
    clear_rows(dpre, swiglu ? 2 * ffn : ffn, row0, rows, col0, end);
    if (swiglu) clear_rows(dpre, 2 * ffn, row0, rows, ffn + col0, ffn + end);
    clear_rows(weighted_h, ffn, row0, rows, col0, end);
    clear_rows(dweight_parts, down_parts(ffn), row0, rows, part, part + Tiling::warps_n);
  }

  template <typename OutT, typename Tiling, typename E>
  LLMK_DEVICE void store_tile(const gemm::Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0, int64_t) const {
    static_assert(Tiling::bn == kDownTileColumns && Tiling::warps_n == kDownWarpsN, "moe.h's down_parts");
    const int lane = int(threadIdx.x % 32), warp = int(threadIdx.x / 32);
    const int warp_column = warp % Tiling::warps_n;
    const int64_t warp_row0 = row0 + (warp / Tiling::warps_n) * Tiling::warp_m;
    const int64_t warp_col0 = col0 + warp_column * Tiling::warp_n;
    const int64_t ffn = this->n, pre_ld = swiglu ? 2 * ffn : ffn;
    const int64_t part = int64_t(blockIdx.x) * Tiling::warps_n + warp_column;
#pragma unroll
    for (int i = 0; i < Tiling::mma_m; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const FragmentCoord c = mma_c_coord(lane, 2 * half);
        const int64_t row = warp_row0 + 16 * i + c.row;
        const bool inside = row < this->m;
        const float w = inside ? load_global(row_weight + row) : 0.0f;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < Tiling::mma_n; ++j) {
          const int64_t col = warp_col0 + 8 * j + c.col;
          if (!inside || col >= ffn) continue;
          // swiglu: (g, u) of columns col and col + 1, interleaved (grouped_gemm's pre); gelu: a pair
          Vec<T, 4> saved;
          if (swiglu) {
            saved = load_global(reinterpret_cast<const Vec<T, 4>*>(saved_pre + row * pre_ld + 2 * col));
          } else {
            const Vec<T, 2> pair = load_global(reinterpret_cast<const Vec<T, 2>*>(saved_pre + row * pre_ld + col));
            saved = Vec<T, 4>{{pair[0], pair[0], pair[1], pair[1]}};
          }
          Vec<T, 2> d_first, d_up, scaled_h;
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const float dz = float(acc.v[i][j][2 * half + q]);
            const ColumnGrad g = activation_backward<T>(swiglu, to_float(saved[2 * q]), to_float(saved[2 * q + 1]), dz, w);
            dot += dz * g.h;
            d_first[q] = from_float<T>(g.d_first);
            if (swiglu) d_up[q] = from_float<T>(g.d_up);
            scaled_h[q] = from_float<T>(w * g.h);
          }
          T* target = dpre + row * pre_ld + col;
          store_global(reinterpret_cast<Vec<T, 2>*>(target), d_first);
          if (swiglu) store_global(reinterpret_cast<Vec<T, 2>*>(target + ffn), d_up);
          store_global(reinterpret_cast<Vec<T, 2>*>(weighted_h + row * ffn + col), scaled_h);
        }
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        if (inside && lane % 4 == 0) store_global(dweight_parts + row * down_parts(ffn) + part, dot);
      }
  }
};

// weight_grad: the same kernel with both operands k-major (rows r of a and b, gathered or not) and
// blockIdx.z an expert: its k tiles are its rows [offsets[e], offsets[e + 1]) (whole 64-row blocks,
// so whole k tiles), its output the (m, n) matrix e of out. An expert with no rows writes zeros.
using WeightGradTiling = gemm::Tiling<128, 128, 32, 2, 4, 4>;

template <typename T>
struct WeightGradParams : gemm::TiledParams {
  const T* a;
  int64_t lda;
  const int32_t* a_rows;
  const T* b;
  int64_t ldb;
  const int32_t* b_rows;
  const int32_t* expert_offsets;
  static constexpr bool split_k = false;

  template <typename Tiling>
  LLMK_DEVICE gemm::KMajorTileLoader<T, Tiling, Tiling::bm> loader_a() const { return {a, lda, m, k, a_rows}; }
  template <typename Tiling>
  LLMK_DEVICE gemm::KMajorTileLoader<T, Tiling, Tiling::bn> loader_b() const { return {b, ldb, n, k, b_rows}; }
  template <typename Tiling>
  LLMK_DEVICE void k_tile_range(int64_t, int64_t& first, int64_t& count) const {
    const int64_t begin = load_global(expert_offsets + blockIdx.z), end = load_global(expert_offsets + blockIdx.z + 1);
    first = begin / WeightGradTiling::bk;
    count = (end - begin) / WeightGradTiling::bk;
  }
  LLMK_DEVICE int64_t out_offset() const { return int64_t(blockIdx.z) * m * n; }
};

// The tiled parameters and operands of a grouped product as p gives them.
template <typename T, bool KMajorB>
void set_grouped(GroupedParams<T, KMajorB>& params, const GroupedProblem& p) {
  const bool swiglu = p.activation == gemm::Activation::swiglu;
  static_cast<gemm::TiledParams&>(params) =
      gemm::TiledParams{p.rows, p.n, p.k,
                        gemm::Epilogue{p.out, swiglu ? p.n / 2 : p.n, p.out_dtype == DType::f32, nullptr, p.row_scale,
                                       nullptr, p.activation, false, p.rows, p.n},
                        nullptr, 0};
  params.a = static_cast<const T*>(p.a);
  params.lda = p.lda;
  params.a_rows = p.a_rows;
  params.b = static_cast<const T*>(p.b);
  params.block_expert = p.block_expert;
  params.pair_half = swiglu ? p.n / 2 : 0;
  params.pre = static_cast<T*>(p.pre);
}

}  // namespace

void grouped_gemm_device(const GroupedProblem& p, DeviceStream stream) {
  static_assert(MoeTiling::bm == kMoeBlock, "a tile's rows are one permutation block");
  dispatch<bf16, f16>(p.dtype, "grouped_gemm (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto run = [&](auto params) {
      set_grouped(params, p);
      gemm::launch_tiled<T, T, MoeTiling, float>("moe grouped gemm", "", params, gemm::SplitK{}, stream);
    };
    if (p.b_k_major) run(GroupedParams<T, true>{});
    else run(GroupedParams<T, false>{});
  });
}

void down_backward_device(const DownBackwardProblem& p, DeviceStream stream) {
  static_assert(MoeTiling::bn == kDownTileColumns && MoeTiling::warps_n == kDownWarpsN, "moe.h's down_parts");
  LLMK_CHECK(p.dz.b_k_major && !p.dz.pre, ValueError, "down_backward: dZ reads W_down k-major and saves nothing");
  dispatch<bf16, f16>(p.dz.dtype, "down_backward (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    DownBackwardParams<T> params;
    set_grouped<T, true>(params, p.dz);
    params.saved_pre = static_cast<const T*>(p.pre);
    params.row_weight = p.row_weight;
    params.dpre = static_cast<T*>(p.dpre);
    params.weighted_h = static_cast<T*>(p.weighted_h);
    params.dweight_parts = p.dweight_parts;
    params.swiglu = p.activation == gemm::Activation::swiglu;
    gemm::launch_tiled<T, T, MoeTiling, float>("moe down backward", "", params, gemm::SplitK{}, stream);
  });
}

void weight_grad_device(const WeightGradProblem& p, DeviceStream stream) {
  static_assert(kMoeBlock % WeightGradTiling::bk == 0, "an expert's rows are whole k tiles");
  dispatch<bf16, f16>(p.dtype, "weight_grad (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    WeightGradParams<T> params;
    static_cast<gemm::TiledParams&>(params) =
        gemm::TiledParams{p.m, p.n, p.rows,
                          gemm::Epilogue{p.out, p.n, p.out_dtype == DType::f32, nullptr, nullptr, nullptr,
                                         gemm::Activation::none, false, p.m, p.n},
                          nullptr, 0};
    params.a = static_cast<const T*>(p.a);
    params.lda = p.lda;
    params.a_rows = p.a_rows;
    params.b = static_cast<const T*>(p.b);
    params.ldb = p.ldb;
    params.b_rows = p.b_rows;
    params.expert_offsets = p.expert_offsets;
    gemm::launch_tiled<T, T, WeightGradTiling, float>("moe weight grad", "", params, gemm::SplitK{}, stream,
                                                      p.experts);
  });
}

void permute_device(const PermuteProblem& p, DeviceStream stream) {
  const int64_t chunks = (p.tokens * p.top_k + kPermuteChunk - 1) / kPermuteChunk;
  LLMK_CHECK(chunks < (int64_t(1) << 31), ValueError, "permute: too many pairs");
  const size_t counts_bytes = size_t(p.experts) * sizeof(int32_t);
  launch("permute count", permute_count_kernel, LaunchShape{dim3(uint32_t(chunks)), dim3(kPermuteThreads), counts_bytes},
         stream, p);
  launch("permute offsets", permute_offsets_kernel, LaunchShape{dim3(1), dim3(uint32_t(kMaxExperts)), counts_bytes},
         stream, p, chunks);
  launch("permute place", permute_place_kernel,
         LaunchShape{dim3(uint32_t(chunks)), dim3(kPermuteThreads), kPermuteWarps * counts_bytes}, stream, p);
  launch("permute pad", permute_pad_kernel,
         LaunchShape{dim3(uint32_t((p.rows + kPermuteThreads - 1) / kPermuteThreads)), dim3(kPermuteThreads)}, stream,
         p, chunks);
}

void route_device(const RouteProblem& p, DeviceStream stream) {
  launch("route zero counts", zero_counts_kernel,
         LaunchShape{dim3(uint32_t((p.experts + kZeroThreads - 1) / kZeroThreads)), dim3(kZeroThreads)}, stream,
         p.tokens_per_expert, p.experts);
  LLMK_CHECK((p.tokens + kRouteWarps - 1) / kRouteWarps < (int64_t(1) << 31), ValueError, "route: ", p.tokens,
             " tokens are too many for one launch");
  dispatch<float, bf16, f16>(p.dtype, "route (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch("route", route_kernel<T>,
           LaunchShape{dim3(uint32_t((p.tokens + kRouteWarps - 1) / kRouteWarps)), dim3(32 * kRouteWarps)}, stream, p);
  });
}

}  // namespace llmk::moe
