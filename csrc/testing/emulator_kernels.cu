// The SIMT emulator's own test kernels (emulator_kernels.h); compiled by nvcc and for the emulator.
//
// The correct kernels write deterministic outputs: the same bits under every schedule of the
// emulator and on a GPU. The buggy kernels each hold one planted bug that the emulator must report;
// tests/test_emulator.py finds the lines it expects in the reports by the `// @name` markers, so a
// marker stays on the line of the access or barrier it names.
#include <cstdint>
#include <string>

#include "common/cp_async.h"
#include "common/launch.h"
#include "common/vector_io.h"
#include "testing/emulator_kernels.h"

namespace llmk::testing {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// -- correct kernels -------------------------------------------------------------------------------

// (a) Block reduction over shared memory, reused by a loop: each block normalises kTilesPerBlock
// tiles of kTileThreads elements, out = x - sum(tile) / kTileThreads, the sum a fixed tree. Every
// thread reads the tile's total, so the next tile's stores need the trailing barrier.
constexpr int kTileThreads = 256;
constexpr int kTilesPerBlock = 3;

template <bool kTrailingBarrier>
__global__ void __launch_bounds__(kTileThreads) tile_normalize_kernel(const float* x, float* out) {
  float* s = reinterpret_cast<float*>(dynamic_shared_memory());
  const int t = int(threadIdx.x);
  for (int tile = 0; tile < kTilesPerBlock; ++tile) {
    const int64_t i = (int64_t(blockIdx.x) * kTilesPerBlock + tile) * kTileThreads + t;
    const float v = load_global(x + i);
    store_shared(s + t, v);  // @tile_store
    __syncthreads();
    for (int stride = kTileThreads / 2; stride > 0; stride /= 2) {
      if (t < stride) store_shared(s + t, __fadd_rn(load_shared(s + t), load_shared(s + t + stride)));
      __syncthreads();
    }
    const float total = load_shared(s);  // @tile_total
    store_global(out + i, __fadd_rn(v, -__fmul_rn(total, 1.0f / kTileThreads)));
    if constexpr (kTrailingBarrier) __syncthreads();
  }
}

// (b) Every kind of warp shuffle (widths 32 and 8, 32- and 64-bit values), the votes and the
// __reduce_*_sync, with full and partial masks. Each lane writes kWarpSlots results; a slot a lane
// does not compute holds kNotComputed. Every source lane of a shuffle is in its mask.
constexpr int kWarpOpsThreads = 64;
constexpr int kWarpSlots = 28;
constexpr int kNotComputed = 0x5a5a5a5a;

__global__ void warp_ops_kernel(const int* input, int* out) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = int(threadIdx.x % 32);
  const int v = load_global(input + g);
  int r[kWarpSlots];
  for (int k = 0; k < kWarpSlots; ++k) r[k] = kNotComputed;
  r[0] = __shfl_sync(kFull, v, (lane * 7 + 3) & 31);
  r[1] = __shfl_sync(kFull, v, lane + 5, 8);  // the source index wraps within the 8-lane segment
  r[2] = __shfl_up_sync(kFull, v, 3);
  r[3] = __shfl_up_sync(kFull, v, 3, 8);
  r[4] = __shfl_down_sync(kFull, v, 5);
  r[5] = __shfl_down_sync(kFull, v, 5, 8);
  r[6] = __shfl_xor_sync(kFull, v, 9);
  r[7] = __shfl_xor_sync(kFull, v, 3, 8);
  r[8] = __shfl_xor_sync(kFull, v, 12, 8);  // lane mask >= width: earlier segments are readable, later not
  r[9] = int(__ballot_sync(kFull, v & 1));
  r[10] = __any_sync(kFull, (v & 15) == 3);
  r[11] = __all_sync(kFull, v > -990);
  r[12] = __reduce_add_sync(kFull, v);
  r[13] = __reduce_min_sync(kFull, v);
  r[14] = __reduce_max_sync(kFull, v);
  r[15] = int(__reduce_min_sync(kFull, unsigned(v)));
  r[16] = int(__reduce_max_sync(kFull, unsigned(v)));
  r[17] = __float_as_int(__shfl_xor_sync(kFull, float(v) * 0.5f, 1));
  const long long wide = (long long)((unsigned long long)(unsigned)v << 32 | unsigned(lane));
  const long long moved = __shfl_down_sync(kFull, wide, 2);
  r[18] = int((unsigned long long)moved >> 32);
  r[19] = int(unsigned(moved));
  if (lane < 16) {
    constexpr unsigned kLow = 0x0000ffffu;
    r[20] = __shfl_xor_sync(kLow, v, 5);
    r[21] = __shfl_down_sync(kLow, v, 4, 16);
    r[22] = int(__ballot_sync(kLow, v > 0));
    r[23] = __reduce_add_sync(kLow, v);
    r[24] = __all_sync(kLow, v & 1);
  } else {
    constexpr unsigned kHigh = 0xffff0000u;
    r[20] = __shfl_sync(kHigh, v, 3, 8);
    r[21] = __shfl_up_sync(kHigh, v, 1, 16);
    r[22] = int(__ballot_sync(kHigh, v < 0));
    r[23] = __reduce_max_sync(kHigh, v);
    r[24] = __any_sync(kHigh, v & 1);
  }
  if ((lane & 1) == 0) {
    constexpr unsigned kEven = 0x55555555u;
    r[25] = __shfl_xor_sync(kEven, v, 2);
    r[26] = int(__reduce_min_sync(kEven, unsigned(v)));
    r[27] = int(__ballot_sync(kEven, 1));
  }
  for (int k = 0; k < kWarpSlots; ++k) store_global(out + g * kWarpSlots + k, r[k]);
}

// (c) atomicAdd of ints and floats from every thread of many blocks into 8 + 8 counters (out[0:8]
// ints, out[8:16] floats). The float addends are multiples of 1/4 whose partial sums are exact, so
// any order of the additions gives the same bits.
constexpr int kAtomicThreads = 128;

__global__ void atomics_kernel(const int* input, int* out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int v = load_global(input + i);
  atomicAdd(out + (i % 8), v);
  atomicAdd(reinterpret_cast<float*>(out + 8) + (i % 8), float(v) * 0.25f);
}

// (d) A 2D grid of 3D blocks (24 threads: a partial warp): each thread writes its coordinates.
constexpr int kCoordinateSlots = 12;
const dim3 kCoordinateGrid(3, 2, 1);
const dim3 kCoordinateBlock(4, 3, 2);

__global__ void coordinates_kernel(int* out) {
  const unsigned block_linear = blockIdx.y * gridDim.x + blockIdx.x;
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned thread_linear = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  int* row = out + (int64_t(block_linear) * threads + thread_linear) * kCoordinateSlots;
  const unsigned values[kCoordinateSlots] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                                             blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
  for (int k = 0; k < kCoordinateSlots; ++k) store_global(row + k, int(values[k]));
}

// (e) Warp-level exchanges through shared memory ordered by __syncwarp() only (no __syncthreads):
// a full-warp reversal, a rewrite of the same words, a rotation within each half-warp, then the
// half-warps synchronise on their own and swap within the half. Outputs 3 values per thread.
constexpr int kExchangeThreads = 128;
constexpr int kExchangeSlots = 3;

__global__ void warp_exchange_kernel(const int* input, int* out) {
  int* s = reinterpret_cast<int*>(dynamic_shared_memory());
  const int t = int(threadIdx.x), lane = t % 32, base = t - lane;
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + t;
  const int v = load_global(input + g);
  store_shared(s + t, v);
  __syncwarp();
  const int reversed = load_shared(s + base + (31 - lane));
  __syncwarp();
  store_shared(s + t, reversed * 3 + lane);  // @exchange_rewrite
  __syncwarp();
  const int rotated = load_shared(s + base + (lane & 16) + ((lane + 1) & 15));
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  __syncwarp(half);
  store_shared(s + t, rotated + v);
  __syncwarp(half);
  const int swapped = load_shared(s + (t ^ 8));
  store_global(out + g * kExchangeSlots + 0, reversed);
  store_global(out + g * kExchangeSlots + 1, rotated);
  store_global(out + g * kExchangeSlots + 2, swapped);
}

// Bank conflicts with known costs, one warp per block, 32x32 words of shared memory:
//   fill: 32 accesses of stride 1 (1 wavefront each); stride32: 32-way (32 wavefronts);
//   stride1: 1; stride2: 2-way (2); vec16: 16 bytes per lane, contiguous (4 quarter-warp phases, 4).
constexpr int kBankThreads = 32;

__global__ void bank_conflicts_kernel(int* out) {
  int* s = reinterpret_cast<int*>(dynamic_shared_memory());
  const int lane = int(threadIdx.x);
  for (int i = 0; i < 32; ++i) store_shared(s + i * 32 + lane, i * 32 + lane);  // @bank_fill
  __syncwarp();
  int sum = load_shared(s + lane * 32);  // @bank_stride32
  sum += load_shared(s + lane);  // @bank_stride1
  sum += load_shared(s + lane * 2);  // @bank_stride2
  const Vec<int, 4> q = load_shared(reinterpret_cast<const Vec<int, 4>*>(s) + lane);  // @bank_vec16
  sum += q[0] + q[1] + q[2] + q[3];
  store_global(out + int64_t(blockIdx.x) * kBankThreads + lane, sum);
}

// -- buggy kernels (64 threads a block; each writes out[thread] so that it does something) ---------
constexpr int kBuggyThreads = 64;

// A shared write read by a thread of another warp with no __syncthreads() between.
__global__ void race_kernel(int* out) {
  int* s = reinterpret_cast<int*>(dynamic_shared_memory());
  const int t = int(threadIdx.x);
  store_shared(s + t, 0);
  __syncthreads();
  store_shared(s + t, t);  // @race_write
  store_global(out + t, load_shared(s + (t ^ 32)));  // @race_read
}

// Reads a shared word that no thread wrote.
__global__ void poison_kernel(int* out) {
  int* s = reinterpret_cast<int*>(dynamic_shared_memory());
  const int t = int(threadIdx.x);
  store_shared(s + t, t);
  __syncthreads();
  store_global(out + t, load_shared(s + t + kBuggyThreads));  // @poison_read
}

// The last thread reads one word past the block's shared memory.
__global__ void shared_out_of_bounds_kernel(int* out) {
  int* s = reinterpret_cast<int*>(dynamic_shared_memory());
  const int t = int(threadIdx.x);
  store_shared(s + t, t);
  __syncthreads();
  store_global(out + t, load_shared(s + t + 1));  // @shared_oob_read
}

// An off-by-one tail: `i <= n` instead of `i < n`.
__global__ void global_off_by_one_kernel(const int* input, int* out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) store_global(out + i, load_global(input + i) + 1);  // @global_tail
}

// __syncthreads() in both branches of a divergent `if`: two different barriers.
__global__ void divergent_syncthreads_kernel(int* out) {
  const int t = int(threadIdx.x);
  if (t < 32) {
    __syncthreads();  // @divergent_a
  } else {
    __syncthreads();  // @divergent_b
  }
  store_global(out + t, t);
}

// Threads that returned early never reach the barrier the others wait at.
__global__ void barrier_after_early_return_kernel(int* out) {
  const int t = int(threadIdx.x);
  if (t >= 48) return;
  __syncthreads();  // @early_return_barrier
  store_global(out + t, t);
}

// Half of each warp skips a full-mask shuffle that the other half waits in, and waits at a barrier
// instead. (Had the skipping lanes exited, the shuffle would complete: PTX's shfl.sync waits only for
// the mask's non-exited lanes.)
__global__ void shuffle_missing_lanes_kernel(int* out) {
  const int t = int(threadIdx.x);
  int r = t;
  if (t % 32 < 16) r = __shfl_xor_sync(kFull, t, 1);  // @missing_lanes_shuffle
  else __syncthreads();  // @missing_lanes_barrier
  store_global(out + t, r);
}

// Lane 0 shuffles with a mask that leaves lane 0 out.
__global__ void shuffle_mask_excludes_lane_kernel(int* out) {
  const int t = int(threadIdx.x);
  store_global(out + t, __shfl_sync(0xfffffffeu, t, 1));  // @excluding_mask
}

// The two halves of a warp meet in different collectives.
__global__ void collective_mismatch_kernel(int* out) {
  const int t = int(threadIdx.x);
  int r;
  if (t % 32 < 16) {
    r = __shfl_xor_sync(kFull, t, 1);  // @mismatch_shuffle
  } else {
    r = int(__ballot_sync(kFull, t & 1));  // @mismatch_ballot
  }
  store_global(out + t, r);
}

// A vector load from an address not aligned to its size (a misaligned-address fault on the GPU).
__global__ void misaligned_vector_kernel(int* out) {
  const int t = int(threadIdx.x);
  if (t == 0) store_global(reinterpret_cast<Vec<int, 2>*>(out + 1), Vec<int, 2>{{1, 2}});  // @misaligned_store
}

// Thread 32 writes bytes a cp.async of thread 0 has not yet landed: its data would overwrite them.
__global__ void write_while_copy_pending_kernel(int* out) {
  int* shared = reinterpret_cast<int*>(dynamic_shared_memory());
  const int t = int(threadIdx.x);
  if (t == 0) cp_async<16>(shared, out, 16);  // @pending_copy
  cp_async_commit();
  __syncthreads();
  if (t == 32) store_shared(shared, 12345);  // @write_pending
  __syncthreads();
  cp_async_wait<0>();
  __syncthreads();
  store_global(out + t, load_shared(shared + t % 4));
}

// Two copies in flight to the same bytes (the second lands after the first's wait).
__global__ void copy_twice_kernel(int* out) {
  int* shared = reinterpret_cast<int*>(dynamic_shared_memory());
  const int t = int(threadIdx.x);
  if (t == 0) {
    cp_async<16>(shared, out, 16);
    cp_async_commit();
    cp_async<16>(shared, out + 4, 16);  // @copy_twice
    cp_async_commit();
  }
  cp_async_wait<0>();
  __syncthreads();
  store_global(out + t, load_shared(shared + t % 4));
}

// Never finishes: thread 0 spins on a shared flag nobody sets.
__global__ void spin_forever_kernel(int* out) {
  int* shared = reinterpret_cast<int*>(dynamic_shared_memory());
  const int t = int(threadIdx.x);
  if (t == 0) store_shared(shared, 0);
  __syncthreads();
  if (t == 0)
    while (load_shared(shared) == 0) __nanosleep(100);  // @spin
  store_global(out + t, t);
}

// Correct (no report): every lane reads a word, __syncwarp orders those reads before lane 0's write;
// then the upper half of each warp exits and the lower half shuffles with a full mask (PTX waits for
// the non-exited lanes only). out[t] = 7 + (t ^ 1) for lanes < 16, 7 otherwise.
__global__ void broadcast_then_exit_kernel(int* out) {
  int* shared = reinterpret_cast<int*>(dynamic_shared_memory());
  const int t = int(threadIdx.x), warp = t / 32;
  if (t % 32 == 0) store_shared(shared + warp, 7);
  __syncwarp();
  const int seven = load_shared(shared + warp);
  __syncwarp();
  if (t % 32 == 0) store_shared(shared + warp, 8);
  store_global(out + t, seven);
  if (t % 32 >= 16) return;
  store_global(out + t, seven + __shfl_xor_sync(kFull, t, 1));
}

// For the launches the hardware refuses.
__global__ void trivial_kernel(int* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) store_global(out, 1);
}

// -- the launcher's checks ---------------------------------------------------------------------------
const TensorView& required_input(const TensorView* input, const std::string& name) {
  LLMK_CHECK(input != nullptr, ValueError, "emulator test kernel '", name, "' needs an input tensor");
  return *input;
}

int64_t blocks_for(int64_t numel, int64_t per_block, const std::string& name, const char* what) {
  LLMK_CHECK(numel > 0 && numel % per_block == 0, ValueError, "emulator test kernel '", name, "': ", what,
             " must have a positive multiple of ", per_block, " elements; got ", numel);
  return numel / per_block;
}

}  // namespace

void emulator_kernel_device(const std::string& name, const TensorView& out, const TensorView* input,
                            DeviceStream stream) {
  const char* kernel = name.c_str();
  if (name == "tile_normalize" || name == "tile_normalize_no_trailing_barrier") {
    const TensorView& x = required_input(input, name);
    const int64_t blocks = blocks_for(x.numel(), int64_t(kTileThreads) * kTilesPerBlock, name, "input");
    out.check_numel(x.numel());
    const LaunchShape shape{dim3(unsigned(blocks)), dim3(kTileThreads), kTileThreads * sizeof(float)};
    if (name == "tile_normalize")
      launch(kernel, tile_normalize_kernel<true>, shape, stream, x.data<float>(), out.data<float>());
    else
      launch(kernel, tile_normalize_kernel<false>, shape, stream, x.data<float>(), out.data<float>());
  } else if (name == "warp_ops") {
    const TensorView& x = required_input(input, name);
    const int64_t blocks = blocks_for(x.numel(), kWarpOpsThreads, name, "input");
    out.check_numel(x.numel() * kWarpSlots);
    launch(kernel, warp_ops_kernel, LaunchShape{dim3(unsigned(blocks)), dim3(kWarpOpsThreads)}, stream,
           x.data<int32_t>(), out.data<int32_t>());
  } else if (name == "atomics") {
    const TensorView& x = required_input(input, name);
    out.check_numel(16);
    const int64_t n = x.numel();
    const unsigned blocks = unsigned((n + kAtomicThreads - 1) / kAtomicThreads);
    launch(kernel, atomics_kernel, LaunchShape{dim3(blocks), dim3(kAtomicThreads)}, stream, x.data<int32_t>(),
           out.data<int32_t>(), n);
  } else if (name == "coordinates") {
    out.check_numel(int64_t(kCoordinateGrid.x) * kCoordinateGrid.y * kCoordinateBlock.x * kCoordinateBlock.y *
                    kCoordinateBlock.z * kCoordinateSlots);
    launch(kernel, coordinates_kernel, LaunchShape{kCoordinateGrid, kCoordinateBlock}, stream, out.data<int32_t>());
  } else if (name == "warp_exchange") {
    const TensorView& x = required_input(input, name);
    const int64_t blocks = blocks_for(x.numel(), kExchangeThreads, name, "input");
    out.check_numel(x.numel() * kExchangeSlots);
    launch(kernel, warp_exchange_kernel,
           LaunchShape{dim3(unsigned(blocks)), dim3(kExchangeThreads), kExchangeThreads * sizeof(int)}, stream,
           x.data<int32_t>(), out.data<int32_t>());
  } else if (name == "bank_conflicts") {
    const int64_t blocks = blocks_for(out.numel(), kBankThreads, name, "out");
    launch(kernel, bank_conflicts_kernel,
           LaunchShape{dim3(unsigned(blocks)), dim3(kBankThreads), 32 * 32 * sizeof(int)}, stream,
           out.data<int32_t>());
  } else if (name == "global_off_by_one") {
    const TensorView& x = required_input(input, name);
    out.check_numel(x.numel());
    const int64_t n = x.numel();
    const unsigned blocks = unsigned(n / kBuggyThreads + 1);
    launch(kernel, global_off_by_one_kernel, LaunchShape{dim3(blocks), dim3(kBuggyThreads)}, stream,
           x.data<int32_t>(), out.data<int32_t>(), n);
  } else if (name == "launch_too_many_threads") {
    launch(kernel, trivial_kernel, LaunchShape{dim3(1), dim3(1025)}, stream, out.data<int32_t>());
  } else if (name == "launch_too_much_shared") {
    launch(kernel, trivial_kernel, LaunchShape{dim3(1), dim3(32), emu::kMaxDynamicSharedBytes + 1024}, stream,
           out.data<int32_t>());
  } else {
    // The buggy kernels that take one block of kBuggyThreads and out[kBuggyThreads].
    void (*buggy)(int*) = nullptr;
    size_t shared = kBuggyThreads * sizeof(int);
    if (name == "race_missing_syncthreads") buggy = race_kernel;
    else if (name == "poison_read") { buggy = poison_kernel; shared *= 2; }
    else if (name == "shared_out_of_bounds") buggy = shared_out_of_bounds_kernel;
    else if (name == "divergent_syncthreads") buggy = divergent_syncthreads_kernel;
    else if (name == "barrier_after_early_return") buggy = barrier_after_early_return_kernel;
    else if (name == "shuffle_missing_lanes") buggy = shuffle_missing_lanes_kernel;
    else if (name == "shuffle_mask_excludes_lane") buggy = shuffle_mask_excludes_lane_kernel;
    else if (name == "collective_mismatch") buggy = collective_mismatch_kernel;
    else if (name == "misaligned_vector") buggy = misaligned_vector_kernel;
    else if (name == "write_while_copy_pending") buggy = write_while_copy_pending_kernel;
    else if (name == "copy_twice") buggy = copy_twice_kernel;
    else if (name == "spin_forever") buggy = spin_forever_kernel;
    else if (name == "broadcast_then_exit") buggy = broadcast_then_exit_kernel;
    LLMK_CHECK(buggy != nullptr, ValueError, "unknown emulator test kernel '", name, "'");
    out.check_numel(kBuggyThreads);
    launch(kernel, buggy, LaunchShape{dim3(1), dim3(kBuggyThreads), shared}, stream, out.data<int32_t>());
  }
}

}  // namespace llmk::testing
