// CUDA kernels of the LoRA family (lora.h). Compiled by nvcc for the GPU and by the host compiler for
// the emulator (docs/emulator.md).
//
// Two launches of the GEMM core's tiled kernel:
//   shrink  s = scale (x Aᵀ), (M, padded(r)) in x's dtype: 64 x 32 tiles (the rank is narrow), its
//           epilogue the scale and the rounding; columns past r come out zero (A's rows there are
//           zero-filled);
//   fused   out = [x | s] · [W | B]ᵀ + bias: ConcatTileLoader on both sides, k = padded(K) +
//           padded(r); the core's tilings and split-K at small M, the core's epilogue (bias).
// Transposed (dx = dy W + (scale dy B) A): the same with the weights read k-major.
#include <type_traits>

#include "core/dispatch.h"
#include "gemm/core.cuh"
#include "lora/lora.h"

namespace llmk::lora {
namespace {

using ShrinkTiling = gemm::Tiling<64, 32, 32, 2, 1, 4>;

// The weights as the B operand: (n, k) row-major, or k-major (k, n) for the transposed product.
template <typename T, typename Tiling, int Rows, bool KMajor>
using WeightLoader = std::conditional_t<KMajor, gemm::KMajorTileLoader<T, Tiling, Rows>, gemm::RowTileLoader<T, Tiling, Rows>>;

template <typename T, typename Tiling, int Rows, bool KMajor>
LLMK_DEVICE WeightLoader<T, Tiling, Rows, KMajor> weight_loader(const T* base, int64_t n, int64_t k) {
  if constexpr (KMajor) return {base, n, n, k};   // (k, n) row-major: rows of n
  else return {base, k, n, k, nullptr};
}

template <typename T, bool KMajor>
struct ShrinkParams : gemm::TiledParams {
  const T* x;
  int64_t ldx;
  const T* by;   // A (r, K), or B (N, r) k-major
  T* shrink;
  int64_t ld_shrink, rank;
  float scale;
  static constexpr bool split_k = false;

  template <typename Tiling>
  LLMK_DEVICE gemm::RowTileLoader<T, Tiling, Tiling::bm> loader_a() const { return {x, ldx, m, k, nullptr}; }
  // (n is padded(r): the weight's columns past r are zero-filled, so those columns of s come out zero;
  // its row stride is r)
  template <typename Tiling>
  LLMK_DEVICE WeightLoader<T, Tiling, Tiling::bn, KMajor> loader_b() const {
    if constexpr (KMajor) return {by, rank, rank, k};
    else return {by, k, rank, k, nullptr};
  }
  template <typename OutT, typename Tiling, typename E>
  LLMK_DEVICE void store_tile(const gemm::Accumulators<Tiling, E>& acc, int64_t row0, int64_t col0, int64_t) const {
    epilogue.for_each_pair(acc, row0, col0, [&](int64_t row, int64_t col, float v0, float v1) {
      store_global(reinterpret_cast<Vec<T, 2>*>(shrink + row * ld_shrink + col),
                   Vec<T, 2>{{from_float<T>(scale * v0), from_float<T>(scale * v1)}});
    });
  }
};

template <typename T, bool KMajor>
struct FusedParams : gemm::TiledParams {
  const T* x;
  int64_t ldx, in_features;
  const T* weight;
  const T* shrink;
  int64_t ld_shrink, rank;
  const T* expand_by;   // B (N, r), or A (r, K) k-major

  template <typename Tiling>
  using LoaderA = gemm::ConcatTileLoader<gemm::RowTileLoader<T, Tiling, Tiling::bm>, Tiling>;
  template <typename Tiling>
  using LoaderB = gemm::ConcatTileLoader<WeightLoader<T, Tiling, Tiling::bn, KMajor>, Tiling>;
  template <typename Tiling>
  LLMK_DEVICE LoaderA<Tiling> loader_a() const {
    return {{x, ldx, m, in_features, nullptr}, {shrink, ld_shrink, m, rank, nullptr}, padded(in_features)};
  }
  template <typename Tiling>
  LLMK_DEVICE LoaderB<Tiling> loader_b() const {
    return {weight_loader<T, Tiling, Tiling::bn, KMajor>(weight, n, in_features),
            weight_loader<T, Tiling, Tiling::bn, KMajor>(expand_by, n, rank), padded(in_features)};
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
                    kSegment % ShrinkTiling::bk == 0,
                "the concatenated segments start on a k tile of every tiling");
  const int64_t r_pad = padded(p.rank), k_total = padded(p.in_features) + r_pad;
  const gemm::SplitK split = gemm::split_k(p.m, p.out_features, k_total);
  LLMK_CHECK(split.splits == 1 || p.workspace, ValueError, "lora_linear: split-K needs a workspace");
  dispatch<bf16, f16>(p.dtype, "lora_linear (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto run = [&](auto transposed) {
      constexpr bool KMajor = decltype(transposed)::value;
      ShrinkParams<T, KMajor> shrink;
      static_cast<gemm::TiledParams&>(shrink) = gemm::TiledParams{
          p.m, r_pad, p.in_features,
          gemm::Epilogue{nullptr, r_pad, false, nullptr, nullptr, nullptr, gemm::Activation::none, false, p.m, r_pad},
          nullptr, 0};
      shrink.x = static_cast<const T*>(p.x_lora);
      shrink.ldx = p.ld_lora;
      shrink.by = static_cast<const T*>(KMajor ? p.lora_b : p.lora_a);
      shrink.shrink = static_cast<T*>(p.shrink);
      shrink.ld_shrink = r_pad;
      shrink.rank = p.rank;
      shrink.scale = p.scale;
      gemm::launch_tiled<T, T, ShrinkTiling, float>("lora shrink", "", shrink, gemm::SplitK{}, stream);

      FusedParams<T, KMajor> fused;
      static_cast<gemm::TiledParams&>(fused) = gemm::TiledParams{
          p.m, p.out_features, k_total,
          gemm::Epilogue{p.out, p.out_features, false, p.bias, nullptr, nullptr, gemm::Activation::none, false, p.m,
                         p.out_features},
          p.workspace, 0};
      fused.x = static_cast<const T*>(p.x);
      fused.ldx = p.ldx;
      fused.in_features = p.in_features;
      fused.weight = static_cast<const T*>(p.weight);
      fused.shrink = static_cast<const T*>(p.shrink);
      fused.ld_shrink = r_pad;
      fused.rank = p.rank;
      fused.expand_by = static_cast<const T*>(KMajor ? p.lora_a : p.lora_b);
      gemm::launch_sized<T, T, float, gemm::SmallTiling, gemm::MediumTiling, gemm::LargeTiling>(
          "lora fused", "lora fused split-k reduce", fused, split, stream);
    };
    if (p.transposed) run(std::true_type{});
    else run(std::false_type{});
  });
}

}  // namespace llmk::lora
