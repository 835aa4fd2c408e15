// CUDA kernels of the Mixture-of-Experts family (moe.h). Compiled by nvcc for the GPU and by the host
// compiler for the emulator (docs/emulator.md).
//
// route: one warp per token, 8 tokens a block. Lane l holds experts l, l + 32, ... (at most 32 each:
// E <= 1024) in registers; the max and the sum of exponentials are warp reductions; each of the k
// picks is a warp arg-max over the lanes' best untaken experts (moe/route_select.h's order), and the
// per-expert counts are integer atomics (exact, whatever the order).
#include <cmath>

#include "common/device.h"
#include "common/float_types.h"
#include "common/launch.h"
#include "common/vector_io.h"
#include "common/warp_reduce.h"
#include "core/dispatch.h"
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
    if (lane == 0) {
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

}  // namespace

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
