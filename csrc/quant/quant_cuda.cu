// The quantized GEMM family's CUDA kernels (quant.h, docs/quant.md): the GEMM core (gemm/core.cuh)
// with a dequantizing B loader (W4A16) or int8 tiles (W8A8). Compiled by nvcc for the GPU and by
// the host compiler for the emulator (docs/emulator.md).
//
// W4A16 tilings (six instantiations: three tilings x bf16/fp16), k tiles of 64 (two packed blocks):
//   large  128 x 128, 8 warps (64 x 32 each), 4 stages: M and N large enough to fill the GPU
//   medium  64 x  64, 4 warps (32 x 32 each), 4 stages: fewer large tiles than SMs
//   small   16 x  64, 4 warps (16 x 16 each), 6 stages: M <= 16, bound by reading the weights; K is
//           split (gemm.h: plan_split_k) when N alone gives too few blocks, ranges of at least
//           4 k tiles, a deterministic reduce after
//
// W8A16 (int8 weights, bf16/fp16 activations): the W4A16 tilings and split-K with an int8 B tile
// converted to x's dtype at the fragment (exact: |code| <= 127) and the per-channel scales in the
// epilogue (col_scale), so the products are x times the integer codes, scaled once in fp32.
//
// W8A8 tilings (int8 mma.m16n8k32, int32 accumulators; k tiles of 64 bytes, 2 mma steps): the same
// three shapes, no split-K (at M <= 16 W8A8 reads as many weight bytes as W8A16 would; its target is
// large M). Instantiated per output: bf16, fp16 (fp32 shares them) and the raw int32 accumulators.
#include "common/quant_format.h"
#include "common/warp_reduce.h"
#include "core/dispatch.h"
#include "gemm/core.cuh"
#include "quant/int4_loader.cuh"
#include "quant/quant.h"

namespace llmk::quant {
namespace {

using gemm::Epilogue;
using gemm::RowTileLoader;
using gemm::SplitK;
using gemm::TiledParams;
using gemm::Tiling;

static_assert(Int4Small::bm == kInt4SplitMaxRows && Int4Small::bn == kInt4SplitTileN &&
                  Int4Small::bk == kInt4SplitTileK,
              "quant.h's int4_split_k plans for the small tiling");

template <typename T>
struct Int4Params : TiledParams {
  const T* x;
  int64_t ldx;
  const int32_t* packed;
  const T* scales;
  const uint8_t* zeros;
  int64_t group_size;

  template <typename Tiling>
  LLMK_DEVICE RowTileLoader<T, Tiling, Tiling::bm> loader_a() const { return {x, ldx, m, k, nullptr}; }
  template <typename Tiling>
  LLMK_DEVICE Int4TileLoader<T, Tiling> loader_b() const {
    return {packed, scales, zeros, n, int4_k_blocks(k), group_size};
  }
};

// pack / quantize: one thread per packed word, its eight codes from `code(row, column)` (a uint8 code
// array, or the weight quantized with its group's scale and zero point); unpack: the inverse. A
// conversion, memory-bound; not tuned.
constexpr int kPackThreads = 256;

template <typename Codes>
__global__ void __launch_bounds__(kPackThreads) pack_words_kernel(const Codes code, int64_t n, int64_t k,
                                                                  int32_t* packed) {
  const int64_t word = int64_t(blockIdx.x) * kPackThreads + threadIdx.x;
  if (word >= int4_packed_words(n, k)) return;
  const int64_t k_blocks = int4_k_blocks(k);
  const int lane = int(word % 32);
  const int64_t row = (word / 32 / k_blocks) * kInt4BlockN + lane / 4, column0 = (word / 32 % k_blocks) * kInt4BlockK;
  uint32_t value = 0;
#pragma unroll
  for (int shift = 0; shift < 32; shift += 4) {
    const int64_t column = column0 + int4_block_column(lane, shift);
    if (column < k) value |= code(row, column) << shift;  // past K: code 0
  }
  store_global(packed + word, int32_t(value));
}

struct StoredCodes {
  const uint8_t* codes;
  int64_t k;
  LLMK_DEVICE uint32_t operator()(int64_t row, int64_t column) const {
    return load_global(codes + row * k + column) & 0xfu;
  }
};

template <typename T, typename S>
struct QuantizedCodes {
  const T* w;
  const S* scales;
  const uint8_t* zeros;
  int64_t n, k, group_size;
  LLMK_DEVICE uint32_t operator()(int64_t row, int64_t column) const {
    const int64_t at = column / group_size * n + row;
    return int4_code(to_float(load_global(w + row * k + column)), to_float(load_global(scales + at)),
                     int(load_global(zeros + at)));
  }
};

// Each (row, group)'s scale and zero point: one warp per pair, lanes over the group's elements.
template <typename T, typename S>
__global__ void __launch_bounds__(kPackThreads) int4_groups_kernel(const T* w, int64_t n, int64_t k,
                                                                   int64_t group_size, bool symmetric, S* scales,
                                                                   uint8_t* zeros) {
  const int64_t pair = (int64_t(blockIdx.x) * kPackThreads + threadIdx.x) / 32;
  const int lane = int(threadIdx.x % 32);
  const int64_t groups = k / group_size;
  if (pair >= n * groups) return;   // (whole warps: the pair is the same for all 32 lanes)
  const int64_t row = pair / groups, g = pair % groups;
  const T* values = w + row * k + g * group_size;
  float low = to_float(load_global(values)), high = low, absmax = fabsf(low);
  for (int64_t i = lane; i < group_size; i += 32) {
    const float v = to_float(load_global(values + i));
    low = nan_min(low, v);
    high = nan_max(high, v);
    absmax = nan_max(absmax, fabsf(v));
  }
  low = warp_reduce(low, [](float a, float b) { return nan_min(a, b); });
  high = warp_reduce(high, [](float a, float b) { return nan_max(a, b); });
  absmax = warp_reduce(absmax, [](float a, float b) { return nan_max(a, b); });
  if (lane == 0) {
    const Int4Group q = int4_group<S>(low, high, absmax, symmetric);
    store_global(scales + g * n + row, S{q.scale_bits});
    store_global(zeros + g * n + row, uint8_t(q.zero));
  }
}

__global__ void __launch_bounds__(kPackThreads) unpack_int4_kernel(const int32_t* packed, int64_t n, int64_t k,
                                                                   uint8_t* codes) {
  const int64_t word = int64_t(blockIdx.x) * kPackThreads + threadIdx.x;
  if (word >= int4_packed_words(n, k)) return;
  const int64_t k_blocks = int4_k_blocks(k);
  const int lane = int(word % 32);
  const int64_t row = (word / 32 / k_blocks) * kInt4BlockN + lane / 4, column0 = (word / 32 % k_blocks) * kInt4BlockK;
  const uint32_t value = uint32_t(load_global(packed + word));
#pragma unroll
  for (int shift = 0; shift < 32; shift += 4) {
    const int64_t column = column0 + int4_block_column(lane, shift);
    if (column < k) store_global(codes + row * k + column, uint8_t((value >> shift) & 0xf));
  }
}

LaunchShape pack_shape(int64_t n, int64_t k) {
  return LaunchShape{dim3(uint32_t((int4_packed_words(n, k) + kPackThreads - 1) / kPackThreads)), dim3(kPackThreads)};
}

// W8A16's B: the int8 weight tile (rows of bk bytes, swizzled), each B register two codes converted
// to T: bytes 2t, 2t + 1 (register 0) and 2t + 8, 2t + 9 (register 1) of the step's 16 in row g.
template <typename T, typename Tiling>
struct Int8WeightLoader {
  using Rows = RowTileLoader<int8_t, Tiling, Tiling::bn>;
  static constexpr int bytes = Rows::bytes;
  Rows rows;

  LLMK_DEVICE void load(uint8_t* tile, int64_t col0, int64_t k0, int thread) const { rows.load(tile, col0, k0, thread); }

  LLMK_DEVICE void fragments(uint32_t (&b)[Tiling::mma_n][2], const uint8_t* tile, int kk, int warp_col0,
                             int lane) const {
    constexpr SwizzledTile layout = Rows::layout();
#pragma unroll
    for (int j = 0; j < Tiling::mma_n; ++j) {
      const int row = warp_col0 + 8 * j + lane / 4;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint16_t pair = load_shared(reinterpret_cast<const uint16_t*>(tile + layout.offset(row, 16 * kk + 8 * r + 2 * (lane % 4))));
        b[j][r] = pack_pair<T>(float(int8_t(pair & 0xff)), float(int8_t(pair >> 8)));
      }
    }
  }
};

template <typename T>
struct Int8WeightParams : TiledParams {
  const T* x;
  int64_t ldx;
  const int8_t* w;
  bool aligned16;

  template <typename Tiling>
  LLMK_DEVICE RowTileLoader<T, Tiling, Tiling::bm> loader_a() const { return {x, ldx, m, k, nullptr}; }
  template <typename Tiling>
  LLMK_DEVICE Int8WeightLoader<T, Tiling> loader_b() const { return {{w, k, n, k, nullptr, aligned16}}; }
};

template <typename OutT>
struct Int8Params : TiledParams {
  const int8_t* a;
  const int8_t* b;
  bool aligned16;   // K % 16 == 0: rows start 16-byte aligned

  template <typename Tiling>
  LLMK_DEVICE RowTileLoader<int8_t, Tiling, Tiling::bm> loader_a() const { return {a, k, m, k, nullptr, aligned16}; }
  template <typename Tiling>
  LLMK_DEVICE RowTileLoader<int8_t, Tiling, Tiling::bn> loader_b() const { return {b, k, n, k, nullptr, aligned16}; }
};

using Int8Large = Tiling<128, 128, 64, 2, 4, 4, 1>;
using Int8Medium = Tiling<64, 64, 64, 2, 2, 4, 1>;
using Int8Small = Tiling<16, 32, 128, 1, 2, 4, 1>;

// Per-token quantization: one block per row, two passes over it (the max, then the codes; the second
// reads the row from L1/L2).
constexpr int kTokenThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kTokenThreads) quantize_per_token_kernel(const T* x, int64_t ldx, int64_t k,
                                                                           const float* smooth, int8_t* codes,
                                                                           float* scales) {
  const int64_t row = blockIdx.x;
  const int thread = int(threadIdx.x);
  const T* source = x + row * ldx;
  auto value = [&](int64_t column) {
    const float v = to_float(load_global(source + column));
    return smooth ? div_rn(v, load_global(smooth + column)) : v;
  };
  float absmax = 0.0f;
  for (int64_t column = thread; column < k; column += kTokenThreads) absmax = nan_max(absmax, fabsf(value(column)));
  absmax = warp_reduce(absmax, [](float a, float b) { return nan_max(a, b); });
  auto* partial = reinterpret_cast<float*>(dynamic_shared_memory());
  if (thread % 32 == 0) store_shared(partial + thread / 32, absmax);
  __syncthreads();
  absmax = 0.0f;
#pragma unroll
  for (int w = 0; w < kTokenThreads / 32; ++w) absmax = nan_max(absmax, load_shared(partial + w));
  const float scale = int8_scale(absmax);
  int8_t* out = codes + row * k;
  for (int64_t column = thread; column < k; column += kTokenThreads) store_global(out + column, int8_code(value(column), scale));
  if (thread == 0) store_global(scales + row, scale);
}

}  // namespace

void quantize_per_token_device(const TokenQuantProblem& problem, DeviceStream stream) {
  LLMK_CHECK(problem.m < (int64_t(1) << 31), ValueError, "quantize_per_token: ", problem.m, " rows are too many");
  dispatch<float, bf16, f16>(problem.x_dtype, "quantize_per_token (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch("quantize_per_token", quantize_per_token_kernel<T>,
           LaunchShape{dim3(uint32_t(problem.m)), dim3(kTokenThreads), kTokenThreads / 32 * sizeof(float)}, stream,
           static_cast<const T*>(problem.x), problem.ldx, problem.k, problem.smooth, problem.codes, problem.scales);
  });
}

void int8_linear_device(const Int8Problem& problem, DeviceStream stream) {
  if (problem.m == 0) return;
  auto run = [&](auto out_tag) {
    using OutT = typename decltype(out_tag)::type;
    using E = int32_t;
    Int8Params<OutT> params;
    static_cast<TiledParams&>(params) =
        TiledParams{problem.m, problem.n, problem.k,
                    Epilogue{problem.out, problem.n, problem.out_dtype == DType::f32, problem.bias, problem.a_scales,
                             problem.b_scales, gemm::Activation::none, false, problem.m, problem.n},
                    nullptr, 0};
    params.a = problem.a;
    params.b = problem.b;
    params.aligned16 = problem.k % 16 == 0;
    gemm::launch_sized<int8_t, OutT, E, Int8Small, Int8Medium, Int8Large>("int8_linear", "", params, SplitK{},
                                                                           stream);
  };
  // (a_scales null: the raw int32 accumulators, int8_matmul; fp32 output shares the bf16 kernels)
  if (!problem.a_scales) run(TypeTag<int32_t>{});
  else if (problem.out_dtype == DType::f16) run(TypeTag<f16>{});
  else run(TypeTag<bf16>{});
}

void int8_weight_linear_device(const Int8WeightProblem& problem, DeviceStream stream) {
  if (problem.m == 0) return;
  const SplitK split = int4_split_k(problem.m, problem.n, problem.k);
  LLMK_CHECK(split.splits == 1 || problem.workspace, ValueError, "int8_linear (W8A16): split-K needs a workspace of ",
             int4_split_k_workspace(problem.m, problem.n, problem.k), " floats");
  dispatch<bf16, f16>(problem.x_dtype, "int8_linear W8A16 (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    Int8WeightParams<T> params;
    static_cast<TiledParams&>(params) =
        TiledParams{problem.m, problem.n, problem.k,
                    Epilogue{problem.out, problem.n, false, problem.bias, nullptr, problem.w_scales,
                             gemm::Activation::none, false, problem.m, problem.n},
                    problem.workspace, 0};
    params.x = static_cast<const T*>(problem.x);
    params.ldx = problem.ldx;
    params.w = problem.w;
    params.aligned16 = problem.k % 16 == 0;
    gemm::launch_sized<T, T, float, Int4Small, Int4Medium, Int4Large>(
        "int8_linear_w8a16", "int8_linear_w8a16 split-k reduce", params, split, stream);
  });
}

void pack_int4_device(const uint8_t* codes, int64_t n, int64_t k, int32_t* packed, DeviceStream stream) {
  LLMK_CHECK(int4_packed_words(n, k) / kPackThreads < (int64_t(1) << 31), ValueError, "pack_int4: ", n, " x ", k,
             " codes are too many for one launch");
  launch("pack_int4", pack_words_kernel<StoredCodes>, pack_shape(n, k), stream, StoredCodes{codes, k}, n, k, packed);
}

void quantize_int4_device(const Int4QuantizeProblem& p, DeviceStream stream) {
  LLMK_CHECK(int4_packed_words(p.n, p.k) / kPackThreads < (int64_t(1) << 31), ValueError, "quantize_int4: ", p.n,
             " x ", p.k, " weights are too many for one launch");
  dispatch<float, bf16, f16>(p.w_dtype, "quantize_int4 (CUDA kernel)", [&](auto w_tag) {
    dispatch<bf16, f16>(p.scale_dtype, "quantize_int4 scales", [&](auto scale_tag) {
      using T = typename decltype(w_tag)::type;
      using S = typename decltype(scale_tag)::type;
      const T* w = static_cast<const T*>(p.w);
      S* scales = static_cast<S*>(p.scales);
      const int64_t warps = p.n * (p.k / p.group_size);
      launch("quantize_int4 groups", int4_groups_kernel<T, S>,
             LaunchShape{dim3(uint32_t((warps * 32 + kPackThreads - 1) / kPackThreads)), dim3(kPackThreads)}, stream,
             w, p.n, p.k, p.group_size, p.symmetric, scales, p.zeros);
      launch("quantize_int4", pack_words_kernel<QuantizedCodes<T, S>>, pack_shape(p.n, p.k), stream,
             QuantizedCodes<T, S>{w, scales, p.zeros, p.n, p.k, p.group_size}, p.n, p.k, p.packed);
    });
  });
}

void unpack_int4_device(const int32_t* packed, int64_t n, int64_t k, uint8_t* codes, DeviceStream stream) {
  LLMK_CHECK(int4_packed_words(n, k) / kPackThreads < (int64_t(1) << 31), ValueError, "unpack_int4: ", n, " x ", k,
             " codes are too many for one launch");
  launch("unpack_int4", unpack_int4_kernel, pack_shape(n, k), stream, packed, n, k, codes);
}

void int4_linear_device(const Int4Problem& problem, DeviceStream stream) {
  if (problem.m == 0) return;
  const SplitK split = int4_split_k(problem.m, problem.n, problem.k);
  LLMK_CHECK(split.splits == 1 || problem.workspace, ValueError, "int4_linear: split-K needs a workspace of ",
             int4_split_k_workspace(problem.m, problem.n, problem.k), " floats");
  dispatch<bf16, f16>(problem.x_dtype, "int4_linear (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    Int4Params<T> params;
    static_cast<TiledParams&>(params) =
        TiledParams{problem.m, problem.n, problem.k,
                    Epilogue{problem.out, problem.n, false, problem.bias, nullptr, nullptr, gemm::Activation::none,
                             false, problem.m, problem.n},
                    problem.workspace, 0};
    params.x = static_cast<const T*>(problem.x);
    params.ldx = problem.ldx;
    params.packed = problem.packed;
    params.scales = static_cast<const T*>(problem.scales);
    params.zeros = problem.zeros;
    params.group_size = problem.group_size;
    gemm::launch_sized<T, T, float, Int4Small, Int4Medium, Int4Large>("int4_linear", "int4_linear split-k reduce",
                                                                      params, split, stream);
  });
}

}  // namespace llmk::quant
