// CPU kernel for the MeZO sweep (mezo.h): the same algorithm as mezo_cuda.cu, OpenMP over
// fixed-size chunks of the concatenated tensors so that many small tensors still load-balance.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/errors.h"
#include "mezo/mezo.h"

namespace llmk::mezo {
namespace {

constexpr int64_t kChunkElements = 16384;  // a multiple of 4: chunks start on group boundaries

struct Chunk {
  int tensor;
  int64_t begin, end;  // element range
};

template <typename T>
void sweep_chunk(const SweepTensor& t, int64_t begin, int64_t end, PhiloxKey key,
                 PhiloxKey next_key, float coef, const SweepScalars& s) {
  T* data = static_cast<T*>(t.data);
  for (int64_t group_start = begin; group_start < end; group_start += 4) {
    const uint64_t group = uint64_t(group_start) >> 2;
    const Normal4 z = normal4(key, t.index, group);
    Normal4 z_next{{0.f, 0.f, 0.f, 0.f}};
    if (s.has_next) z_next = normal4(next_key, t.index, group);
    const int count = int(std::min<int64_t>(4, end - group_start));
    for (int e = 0; e < count; ++e) {
      T& element = data[group_start + e];
      element = from_float<T>(
          sweep_element(to_float(element), t.decay, coef, z.z[e], s.next_scale, z_next.z[e]));
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
    const float coef = t.coef_a - t.coef_b * grad;
    sweep_chunk<T>(t, chunks[c].begin, chunks[c].end, key, next_key, coef, s);
  }
}

}  // namespace

void sweep_cpu(DType dtype, const std::vector<SweepTensor>& tensors, const SweepScalars& scalars) {
  switch (dtype) {
    case DType::f32: return sweep_typed<float>(tensors, scalars);
    case DType::bf16: return sweep_typed<bf16>(tensors, scalars);
    case DType::f16: return sweep_typed<f16>(tensors, scalars);
    default: throw TypeError(std::string("mezo sweep: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace llmk::mezo
