// The GEMM core's kernel (gemm.h, core.cuh): dense or gathered A rows, dense B, the full epilogue.
// Compiled by nvcc for the GPU and by the host compiler for the emulator (docs/emulator.md).
//
// Tilings, chosen per problem (six instantiations: three tilings x bf16/fp16):
//   large  128 x 128 x 32, 8 warps (64 x 32 each), 4 stages, 64 KB: M and N large enough to fill the GPU
//   medium  64 x  64 x 32, 4 warps (32 x 32 each), 4 stages, 32 KB: fewer tiles than SMs otherwise
//   small   16 x  32 x 64, 2 warps (16 x 16 each), 6 stages, 36 KB: M <= 16, bound by reading the
//           weights: many narrow blocks over N keep more bytes in flight
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
};

template <typename T, typename Tiling>
__global__ void __launch_bounds__(Tiling::threads) gemm_kernel(const __grid_constant__ KernelParams p) {
  const int64_t row0 = int64_t(blockIdx.y) * Tiling::bm;
  const int64_t col0 = int64_t(blockIdx.x) * Tiling::bn;
  const RowTileLoader<T, Tiling, Tiling::bm> a{static_cast<const T*>(p.a), p.lda, p.m, p.k, p.a_rows};
  const RowTileLoader<T, Tiling, Tiling::bn> b{static_cast<const T*>(p.b), p.ldb, p.n, p.k, nullptr};
  Accumulators<Tiling> acc;
  main_loop<T, Tiling>(acc, a, b, row0, col0, p.k);
  if (p.epilogue.out_is_f32) p.epilogue.store<float>(acc, row0, col0);
  else p.epilogue.store<T>(acc, row0, col0);
}

template <typename T, typename Tiling>
void run(const KernelParams& params, DeviceStream stream) {
  const int64_t row_tiles = (params.m + Tiling::bm - 1) / Tiling::bm;
  const int64_t col_tiles = (params.n + Tiling::bn - 1) / Tiling::bn;
  LLMK_CHECK(row_tiles <= 65535, ValueError, "gemm: m = ", params.m, " needs more than 65535 row tiles of ",
             Tiling::bm);
  launch("gemm", gemm_kernel<T, Tiling>,
         LaunchShape{dim3(uint32_t(col_tiles), uint32_t(row_tiles)), dim3(Tiling::threads), Tiling::shared_bytes},
         stream, params);
}

}  // namespace

void gemm_device(const Problem& problem, DeviceStream stream) {
  KernelParams params{problem.a, problem.lda, problem.a_rows, problem.b, problem.ldb, problem.m, problem.n, problem.k,
                      Epilogue{problem.out, problem.ldo, problem.out_dtype == DType::f32, problem.bias,
                               problem.row_scale, problem.col_scale, problem.activation, problem.accumulate,
                               problem.m, problem.n}};
  if (problem.m == 0) return;
  dispatch<bf16, f16>(problem.dtype, "gemm (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t large_tiles = ((problem.m + 127) / 128) * ((problem.n + 127) / 128);
    if (problem.m <= 16) run<T, Small>(params, stream);
    else if (large_tiles >= kGpuSms) run<T, Large>(params, stream);
    else run<T, Medium>(params, stream);
  });
}

}  // namespace llmk::gemm
