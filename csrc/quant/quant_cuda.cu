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
#include "common/quant_format.h"
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

using Int4Large = Tiling<128, 128, 64, 2, 4, 4>;
using Int4Medium = Tiling<64, 64, 64, 2, 2, 4>;
using Int4Small = Tiling<16, 64, 64, 1, 4, 6>;
static_assert(Int4Small::bm == kInt4SplitMaxRows && Int4Small::bn == kInt4SplitTileN &&
                  Int4Small::bk == kInt4SplitTileK,
              "quant.h's int4_split_k plans for the small tiling");

constexpr int64_t kGpuSms = 132;  // H100 SXM; only the tiling choice depends on it

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

// pack/unpack: one thread per packed word, its eight codes (a conversion, memory-bound; not tuned).
constexpr int kPackThreads = 256;

__global__ void __launch_bounds__(kPackThreads) pack_int4_kernel(const uint8_t* codes, int64_t n, int64_t k,
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
    if (column < k) value |= uint32_t(load_global(codes + row * k + column) & 0xf) << shift;  // past K: code 0
  }
  store_global(packed + word, int32_t(value));
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

}  // namespace

void pack_int4_device(const uint8_t* codes, int64_t n, int64_t k, int32_t* packed, DeviceStream stream) {
  LLMK_CHECK(int4_packed_words(n, k) / kPackThreads < (int64_t(1) << 31), ValueError, "pack_int4: ", n, " x ", k,
             " codes are too many for one launch");
  launch("pack_int4", pack_int4_kernel, pack_shape(n, k), stream, codes, n, k, packed);
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
    const int64_t large_tiles = ((problem.m + 127) / 128) * ((problem.n + 127) / 128);
    if (problem.m <= Int4Small::bm)
      gemm::launch_tiled<T, T, Int4Small, float>("int4_linear", "int4_linear split-k reduce", params, split, stream);
    else if (large_tiles >= kGpuSms)
      gemm::launch_tiled<T, T, Int4Large, float>("int4_linear", "", params, SplitK{}, stream);
    else
      gemm::launch_tiled<T, T, Int4Medium, float>("int4_linear", "", params, SplitK{}, stream);
  });
}

}  // namespace llmk::quant
