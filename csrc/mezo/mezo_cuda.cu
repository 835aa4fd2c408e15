// CUDA kernel for the MeZO sweep (mezo.h); also compiled for the emulated backend (docs/emulator.md).
//
// Multi-tensor launch: up to kTensorsPerLaunch tensors travel by value in the kernel parameters.
// CUDA 12.1+ accepts 32 KB of kernel parameters on sm_70+, so 256 tensors (9.5 KB) per launch: a
// 1B-parameter Llama (201 tensors) is one launch per dtype. Older toolkits keep to the classic
// 4 KB (96 tensors). Each tensor is cut into chunks of kChunkGroups groups of four elements;
// block b handles chunk b of the concatenation and finds its tensor by binary search over the
// chunk prefix sums.
//
// Per thread: kGroupsPerThread independent groups, all loads issued before any generator work so
// that the memory system has them in flight while Philox and Box-Muller run.
//
//   block b:  | g0 g1 ... g255 | g256 ... g511 | ... | g768 ... g1023 |   (groups of 4 elements)
//   thread t: loads g(t), g(t+256), g(t+512), g(t+768): coalesced 16-byte (fp32) / 8-byte loads
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/launch.h"
#include "common/segments.h"
#include "common/vector_io.h"
#include "core/dispatch.h"
#include "mezo/mezo.h"

namespace llmk::mezo {
namespace {

#if CUDART_VERSION >= 12010
constexpr int kTensorsPerLaunch = 256;
constexpr size_t kMaxParameterBytes = 32764;
#else
constexpr int kTensorsPerLaunch = 96;
constexpr size_t kMaxParameterBytes = 4096;
#endif
constexpr int kThreads = 256;
constexpr int kGroupsPerThread = 4;
constexpr int64_t kChunkGroups = int64_t(kThreads) * kGroupsPerThread;

struct LaunchBatch {
  void* data[kTensorsPerLaunch];
  int64_t numel[kTensorsPerLaunch];
  uint32_t index[kTensorsPerLaunch];
  float shrink[kTensorsPerLaunch];
  float coef_a[kTensorsPerLaunch];
  float coef_b[kTensorsPerLaunch];
  int32_t chunk_begin[kTensorsPerLaunch + 1];  // prefix sums of chunks per tensor
  uint8_t vector_aligned[kTensorsPerLaunch];   // data is aligned to a whole group (4 elements)
  int32_t num_tensors;
};

static_assert(sizeof(LaunchBatch) + sizeof(SweepScalars) <= kMaxParameterBytes,
              "kernel parameters exceed what this CUDA version accepts");

template <typename T>
struct alignas(4 * sizeof(T)) Group4 { T v[4]; };

template <typename T>
__global__ void __launch_bounds__(kThreads)
sweep_kernel(const __grid_constant__ LaunchBatch batch, const SweepScalars s) {
  const int32_t chunk = int32_t(blockIdx.x);
  const int k = find_segment(batch.chunk_begin, batch.num_tensors, chunk);
  T* data = static_cast<T*>(batch.data[k]);
  const int64_t numel = batch.numel[k];
  const uint32_t stream_index = batch.index[k];

  const PhiloxKey key = PhiloxKey::from_seed(s.seed.get());
  const PhiloxKey next_key = PhiloxKey::from_seed(s.next_seed.get());
  const float grad = s.grad.get();
  const TensorCoefficients c =
      sweep_coefficients(batch.shrink[k], batch.coef_a[k], batch.coef_b[k], grad, s.restore_scale);

  const int64_t first_group = int64_t(chunk - batch.chunk_begin[k]) * kChunkGroups;
  const int64_t full_groups = batch.vector_aligned[k] ? numel / 4 : 0;  // vector path
  const int64_t all_groups = (numel + 3) / 4;

  Group4<T> values[kGroupsPerThread];
#pragma unroll
  for (int i = 0; i < kGroupsPerThread; ++i) {
    const int64_t g = first_group + i * kThreads + threadIdx.x;
    if (g < full_groups) values[i] = load_global(reinterpret_cast<const Group4<T>*>(data) + g);
  }
#pragma unroll
  for (int i = 0; i < kGroupsPerThread; ++i) {
    const int64_t g = first_group + i * kThreads + threadIdx.x;
    if (g >= all_groups) break;
    const Normal4 z = normal4(key, stream_index, uint64_t(g));
    Normal4 z_next{{0.f, 0.f, 0.f, 0.f}};
    if (s.has_next) z_next = normal4(next_key, stream_index, uint64_t(g));
    if (g < full_groups) {
      Group4<T> out;
#pragma unroll
      for (int e = 0; e < 4; ++e)
        out.v[e] = from_float<T>(sweep_element(to_float(values[i].v[e]), c.shrink, c.coef, z.z[e],
                                               s.next_scale, z_next.z[e]));
      store_global(reinterpret_cast<Group4<T>*>(data) + g, out);
    } else {  // the partial last group, or a tensor not aligned to 4 elements: one at a time
      for (int e = 0; e < 4 && 4 * g + e < numel; ++e) {
        T* element = data + 4 * g + e;
        store_global(element, from_float<T>(sweep_element(to_float(load_global(element)), c.shrink, c.coef,
                                                          z.z[e], s.next_scale, z_next.z[e])));
      }
    }
  }
}

template <typename T>
void sweep_typed(const std::vector<SweepTensor>& tensors, const SweepScalars& scalars,
                 DeviceStream stream) {
  // Build (and check) every launch's parameters before the first launch.
  std::vector<LaunchBatch> batches;
  for (size_t start = 0; start < tensors.size(); start += kTensorsPerLaunch) {
    LaunchBatch& batch = batches.emplace_back();
    const size_t count = std::min(tensors.size() - start, size_t(kTensorsPerLaunch));
    int64_t chunks = 0;
    for (size_t j = 0; j < count; ++j) {
      const SweepTensor& t = tensors[start + j];
      batch.data[j] = t.data;
      batch.numel[j] = t.numel;
      batch.index[j] = t.index;
      batch.shrink[j] = t.shrink;
      batch.coef_a[j] = t.coef_a;
      batch.coef_b[j] = t.coef_b;
      batch.vector_aligned[j] = reinterpret_cast<uintptr_t>(t.data) % sizeof(Group4<T>) == 0;
      batch.chunk_begin[j] = int32_t(chunks);
      chunks += (t.numel + 4 * kChunkGroups - 1) / (4 * kChunkGroups);
      LLMK_CHECK(chunks < INT32_MAX, ValueError, "mezo sweep: more than 2^31 chunks of ",
                 4 * kChunkGroups, " elements in one launch");
    }
    batch.chunk_begin[count] = int32_t(chunks);
    batch.num_tensors = int32_t(count);
  }
  for (const LaunchBatch& batch : batches) {
    const int32_t chunks = batch.chunk_begin[batch.num_tensors];
    launch("mezo sweep", sweep_kernel<T>, LaunchShape{dim3(uint32_t(chunks)), dim3(kThreads)}, stream, batch, scalars);
  }
}

}  // namespace

void sweep_device(DType dtype, const std::vector<SweepTensor>& tensors, const SweepScalars& scalars,
                  DeviceStream stream) {
  dispatch_floating(dtype, "mezo sweep", [&](auto tag) {
    sweep_typed<typename decltype(tag)::type>(tensors, scalars, stream);
  });
}

}  // namespace llmk::mezo
