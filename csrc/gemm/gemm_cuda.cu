// The GEMM core's kernel (gemm.h, core.cuh): dense or gathered A rows, dense B, the full epilogue.
// Compiled by nvcc for the GPU and by the host compiler for the emulator (docs/emulator.md).
//
// Tilings, chosen per problem (twelve instantiations: three tilings x bf16/fp16 x B given (n, k) or k-major):
//   large  128 x 128 x 32, 8 warps (64 x 32 each), 4 stages, 64 KB: M and N large enough to fill the GPU
//   medium  64 x  64 x 32, 4 warps (32 x 32 each), 4 stages, 32 KB: fewer tiles than SMs otherwise
//   small   16 x  32 x 64, 2 warps (16 x 16 each), 6 stages, 36 KB: M <= 16, bound by reading the
//           weights: many narrow blocks over N keep more bytes in flight, and split-K (gemm.h:
//           split_k) over blockIdx.z when N alone gives too few blocks, with a reduce kernel after
#include "core/dispatch.h"
#include "gemm/core.cuh"

namespace llmk::gemm {
namespace {

template <typename T>
struct Params : TiledParams {
  const T* a;
  int64_t lda;
  const int32_t* a_rows;
  const T* b;
  int64_t ldb;

  template <typename Tiling>
  LLMK_DEVICE RowTileLoader<T, Tiling, Tiling::bm> loader_a() const { return {a, lda, m, k, a_rows}; }
  template <typename Tiling>
  LLMK_DEVICE RowTileLoader<T, Tiling, Tiling::bn> loader_b() const { return {b, ldb, n, k, nullptr}; }
};

// B given k-major ((k, n): out = A · B).
template <typename T>
struct KMajorParams : Params<T> {
  template <typename Tiling>
  LLMK_DEVICE KMajorTileLoader<T, Tiling> loader_b() const { return {this->b, this->ldb, this->n, this->k}; }
};

}  // namespace

static_assert(SmallTiling::bn == kSplitTileN && SmallTiling::bk == kSplitTileK && SmallTiling::bm == kSplitMaxRows,
              "gemm.h's split_k sizes its ranges for the small tiling");

void gemm_device(const Problem& problem, DeviceStream stream) {
  if (problem.m == 0) return;
  const SplitK split = split_k(problem.m, problem.n, problem.k);
  LLMK_CHECK(split.splits == 1 || problem.workspace, ValueError, "gemm: split-K needs a workspace of ",
             split_k_workspace(problem.m, problem.n, problem.k), " floats");
  dispatch<bf16, f16>(problem.dtype, "gemm (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    Params<T> params;
    static_cast<TiledParams&>(params) =
        TiledParams{problem.m, problem.n, problem.k,
                    Epilogue{problem.out, problem.ldo, problem.out_dtype == DType::f32, problem.bias,
                             problem.row_scale, problem.col_scale, problem.activation, problem.accumulate,
                             problem.m, problem.n},
                    problem.workspace, 0};
    params.a = static_cast<const T*>(problem.a);
    params.lda = problem.lda;
    params.a_rows = problem.a_rows;
    params.b = static_cast<const T*>(problem.b);
    params.ldb = problem.ldb;
    if (problem.b_k_major) {
      KMajorParams<T> k_major;
      static_cast<Params<T>&>(k_major) = params;
      launch_sized<T, T, float, SmallTiling, MediumTiling, LargeTiling>("gemm", "gemm split-k reduce", k_major, split, stream);
    } else {
      launch_sized<T, T, float, SmallTiling, MediumTiling, LargeTiling>("gemm", "gemm split-k reduce", params, split, stream);
    }
  });
}

}  // namespace llmk::gemm
