// CPU kernel for the MeZO sweep (mezo.h): the same algorithm as mezo_cuda.cu, OpenMP over
// fixed-size chunks of the concatenated tensors so that many small tensors still load-balance.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/dispatch.h"
#include "mezo/mezo.h"

namespace llmk::mezo {
namespace {

constexpr int64_t kChunkElements = 16384;  // a multiple of 4 * kLanes: chunks start on block boundaries

struct Chunk {
  int tensor;
  int64_t begin, end;  // element range
};

// z for kLanes consecutive groups (4 kLanes elements), stored planar: z[e * kLanes + l] is
// element e of group first_group + l. Written as a loop over independent lanes so that the
// compiler vectorizes Philox and Box-Muller across groups; compiled for AVX-512, AVX2 and baseline
// x86-64, picked at load time. Every lane computes exactly what the scalar normal4() computes
// (vector IEEE add/mul/div/sqrt round like scalar ones, and -ffp-contract=off forbids FMA).
constexpr int kLanes = 16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void normal_lanes(PhiloxKey key, uint32_t index, uint64_t first_group, float* __restrict z) {
  for (int l = 0; l < kLanes; ++l) {
    const Normal4 n = normal4(key, index, first_group + uint64_t(l));
    for (int e = 0; e < 4; ++e) z[e * kLanes + l] = n.z[e];
  }
}

template <typename T>
void sweep_chunk(const SweepTensor& t, int64_t begin, int64_t end, PhiloxKey key,
                 PhiloxKey next_key, TensorCoefficients c, const SweepScalars& s) {
  T* data = static_cast<T*>(t.data);
  alignas(64) float z[4 * kLanes];
  alignas(64) float z_next[4 * kLanes] = {};
  for (int64_t block_start = begin; block_start < end; block_start += 4 * kLanes) {
    const uint64_t first_group = uint64_t(block_start) >> 2;
    normal_lanes(key, t.index, first_group, z);
    if (s.has_next) normal_lanes(next_key, t.index, first_group, z_next);
    const int count = int(std::min<int64_t>(4 * kLanes, end - block_start));
    T* block = data + block_start;
    for (int j = 0; j < count; ++j) {
      const int lane_slot = (j & 3) * kLanes + (j >> 2);
      block[j] = from_float<T>(
          sweep_element(to_float(block[j]), c.shrink, c.coef, z[lane_slot], s.next_scale, z_next[lane_slot]));
    }
  }
}

template <typename T>
void sweep_typed(const std::vector<SweepTensor>& tensors, const SweepScalars& s) {
  const PhiloxKey key = PhiloxKey::from_seed(s.seed.get());
  const PhiloxKey next_key = PhiloxKey::from_seed(s.next_seed.get());
  const float grad = s.grad.get();

  std::vector<Chunk> chunks;
  for (int k = 0; k < int(tensors.size()); ++k)
    for (int64_t begin = 0; begin < tensors[k].numel; begin += kChunkElements)
      chunks.push_back(Chunk{k, begin, std::min(tensors[k].numel, begin + kChunkElements)});

  const int64_t num_chunks = int64_t(chunks.size());
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const SweepTensor& t = tensors[chunks[c].tensor];
    const TensorCoefficients coefficients =
        sweep_coefficients(t.shrink, t.coef_a, t.coef_b, grad, s.restore_scale);
    sweep_chunk<T>(t, chunks[c].begin, chunks[c].end, key, next_key, coefficients, s);
  }
}

}  // namespace

void sweep_cpu(DType dtype, const std::vector<SweepTensor>& tensors, const SweepScalars& scalars) {
  dispatch_floating(dtype, "mezo sweep", [&](auto tag) {
    sweep_typed<typename decltype(tag)::type>(tensors, scalars);
  });
}

}  // namespace llmk::mezo
