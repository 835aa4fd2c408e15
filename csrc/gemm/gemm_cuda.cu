// The GEMM core's kernel (gemm.h, core.cuh): dense or gathered A rows, dense B, the full epilogue.
// Compiled by nvcc for the GPU and by the host compiler for the emulator (docs/emulator.md).
//
// Tilings, chosen per problem (six instantiations: three tilings x bf16/fp16):
//   large  128 x 128 x 32, 8 warps (64 x 32 each), 4 stages, 64 KB: M and N large enough to fill the GPU
//   medium  64 x  64 x 32, 4 warps (32 x 32 each), 4 stages, 32 KB: fewer tiles than SMs otherwise
//   small   16 x  32 x 64, 2 warps (16 x 16 each), 6 stages, 36 KB: M <= 16, bound by reading the
//           weights: many narrow blocks over N keep more bytes in flight, and split-K (gemm.h:
//           split_k) over blockIdx.z when N alone gives too few blocks, with a reduce kernel after
#include "common/launch.h"
#include "core/dispatch.h"
#include "gemm/core.cuh"

namespace llmk::gemm {
namespace {

using Large = Tiling<128, 128, 32, 2, 4, 4>;
using Medium = Tiling<64, 64, 32, 2, 2, 4>;
using Small = Tiling<16, 32, 64, 1, 2, 6>;

constexpr int64_t kGpuSms = 132;  // H100 SXM; only the tiling choice depends on it

struct KernelParams {
  const void* a;
  int64_t lda;
  const int32_t* a_rows;
  const void* b;
  int64_t ldb;
  int64_t m, n, k;
  Epilogue epilogue;
  float* partial;            // split-K: gridDim.z ranges of m * n partial sums; null without split
  int64_t tiles_per_split;   // k tiles per range (all of them without split)
};

// (__launch_bounds__(threads, 1): without the 1, ptxas capped the large tiling at 128 registers and
// spilled 8 bytes on sm_80; with it, 154 registers, no spill, one 8-warp block per SM. Which is faster
// is for the GPU run to measure.)
template <typename T, typename Tiling>
__global__ void __launch_bounds__(Tiling::threads, 1) gemm_kernel(const __grid_constant__ KernelParams p) {
  const int64_t row0 = int64_t(blockIdx.y) * Tiling::bm;
  const int64_t col0 = int64_t(blockIdx.x) * Tiling::bn;
  const RowTileLoader<T, Tiling, Tiling::bm> a{static_cast<const T*>(p.a), p.lda, p.m, p.k, p.a_rows};
  const RowTileLoader<T, Tiling, Tiling::bn> b{static_cast<const T*>(p.b), p.ldb, p.n, p.k, nullptr};
  const int64_t k_tiles = (p.k + Tiling::bk - 1) / Tiling::bk;
  const int64_t first_tile = int64_t(blockIdx.z) * p.tiles_per_split;
  const int64_t tiles = first_tile + p.tiles_per_split < k_tiles ? p.tiles_per_split : k_tiles - first_tile;
  Accumulators<Tiling> acc;
  main_loop<T, Tiling>(acc, a, b, row0, col0, first_tile, tiles);
  if (p.partial) p.epilogue.store_partial(acc, row0, col0, p.partial + int64_t(blockIdx.z) * p.m * p.n);
  else if (p.epilogue.out_is_f32) p.epilogue.store<float>(acc, row0, col0);
  else p.epilogue.store<T>(acc, row0, col0);
}

// Split-K's second half: each thread adds the ranges' partial sums of one column pair, in range
// order (deterministic), and runs the epilogue on them.
constexpr int kReduceThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kReduceThreads) split_k_reduce_kernel(const __grid_constant__ KernelParams p,
                                                                        int splits) {
  const int64_t pair = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x;
  const int64_t row = pair / (p.n / 2), col = 2 * (pair % (p.n / 2));
  if (row >= p.m) return;
  float v0 = 0.0f, v1 = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const Vec<float, 2> v = load_global(reinterpret_cast<const Vec<float, 2>*>(p.partial + (s * p.m + row) * p.n + col));
    v0 += v[0];
    v1 += v[1];
  }
  if (p.epilogue.out_is_f32) p.epilogue.store_pair<float>(row, col, v0, v1);
  else p.epilogue.store_pair<T>(row, col, v0, v1);
}

template <typename T, typename Tiling>
void run(KernelParams params, SplitK split, DeviceStream stream) {
  const int splits = split.splits;
  params.tiles_per_split = splits > 1 ? split.tiles_per_split : (params.k + Tiling::bk - 1) / Tiling::bk;
  const int64_t row_tiles = (params.m + Tiling::bm - 1) / Tiling::bm;
  const int64_t col_tiles = (params.n + Tiling::bn - 1) / Tiling::bn;
  LLMK_CHECK(row_tiles <= 65535, ValueError, "gemm: m = ", params.m, " needs more than 65535 row tiles of ",
             Tiling::bm);
  launch("gemm", gemm_kernel<T, Tiling>,
         LaunchShape{dim3(uint32_t(col_tiles), uint32_t(row_tiles), uint32_t(splits)), dim3(Tiling::threads),
                     Tiling::shared_bytes},
         stream, params);
  if (splits > 1) {
    const int64_t pairs = params.m * params.n / 2;
    launch("gemm split-k reduce", split_k_reduce_kernel<T>,
           LaunchShape{dim3(uint32_t((pairs + kReduceThreads - 1) / kReduceThreads)), dim3(kReduceThreads)}, stream,
           params, splits);
  }
}

}  // namespace

static_assert(Small::bn == kSplitTileN && Small::bk == kSplitTileK && Small::bm == kSplitMaxRows,
              "gemm.h's split_k sizes its ranges for the small tiling");

void gemm_device(const Problem& problem, DeviceStream stream) {
  if (problem.m == 0) return;
  const SplitK split = split_k(problem.m, problem.n, problem.k);
  LLMK_CHECK(split.splits == 1 || problem.workspace, ValueError, "gemm: split-K needs a workspace of ",
             split_k_workspace(problem.m, problem.n, problem.k), " floats");
  KernelParams params{problem.a, problem.lda, problem.a_rows, problem.b, problem.ldb, problem.m, problem.n, problem.k,
                      Epilogue{problem.out, problem.ldo, problem.out_dtype == DType::f32, problem.bias,
                               problem.row_scale, problem.col_scale, problem.activation, problem.accumulate,
                               problem.m, problem.n},
                      split.splits > 1 ? problem.workspace : nullptr, 0};
  dispatch<bf16, f16>(problem.dtype, "gemm (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t large_tiles = ((problem.m + 127) / 128) * ((problem.n + 127) / 128);
    if (problem.m <= Small::bm) run<T, Small>(params, split, stream);
    else if (large_tiles >= kGpuSms) run<T, Large>(params, SplitK{}, stream);
    else run<T, Medium>(params, SplitK{}, stream);
  });
}

}  // namespace llmk::gemm
