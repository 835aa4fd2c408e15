// cp.async (sm_80+): asynchronous global -> shared copies of 4, 8 or 16 bytes, grouped by commit and
// waited for by group (PTX ISA, "cp.async", "cp.async.commit_group", "cp.async.wait_group").
//
//   cp_async<16>(tile + offset, row + k, in_bounds ? 16 : 0);   // bytes past source_bytes are zeros
//   cp_async_commit();                                          // closes this thread's current group
//   cp_async_wait<1>();                                         // all but the newest group have landed
//   __syncthreads();                                            // ... and are visible to the block
//
// Emulated: the source is bounds-checked and read at issue, the destination is poisoned (0xFF) and
// marked pending at issue, and the data lands at the wait that completes its group. A read of the
// destination before that wait is reported, and a missing wait leaves NaNs behind.
#pragma once
#include <cstdint>

#include "common/device.h"

namespace llmk {

// Copies `Bytes` bytes: the first `source_bytes` (0..Bytes) from `source`, zeros for the rest (tails
// of a tile read nothing out of bounds: pass 0 and any valid-looking pointer). Both addresses must
// be aligned to `Bytes`. 16-byte copies bypass L1 (.cg): tiles are reused from shared memory.
template <int Bytes>
LLMK_DEVICE void cp_async(void* shared_destination, const void* global_source, int source_bytes LLMK_SITE) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(LLMK_EMULATED)
  emu::cp_async(shared_destination, global_source, Bytes, source_bytes, site);
#else
  const uint32_t destination = static_cast<uint32_t>(__cvta_generic_to_shared(shared_destination));
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(global_source),
                 "r"(source_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(destination), "l"(global_source),
                 "n"(Bytes), "r"(source_bytes)
                 : "memory");
  }
#endif
}

// A 16-byte cp.async of data read once (weights streamed through a weight-only GEMM) with the L2
// evict_first policy, so the stream does not push reused data (activations, scales) out of L2.
// Emulated: cp_async<16> (the emulator models no caches).
LLMK_DEVICE void cp_async_stream16(void* shared_destination, const void* global_source, int source_bytes LLMK_SITE) {
#if defined(LLMK_EMULATED)
  emu::cp_async(shared_destination, global_source, 16, source_bytes, site);
#else
  const uint32_t destination = static_cast<uint32_t>(__cvta_generic_to_shared(shared_destination));
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(destination),
               "l"(global_source), "r"(source_bytes), "l"(policy)
               : "memory");
#endif
}

// Closes the calling thread's current group of copies.
LLMK_DEVICE void cp_async_commit() {
#if defined(LLMK_EMULATED)
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `Pending` of the calling thread's most recent committed groups are in flight.
// Other threads' copies need a barrier after their waits to be visible.
template <int Pending>
LLMK_DEVICE void cp_async_wait(LLMK_SITE_ONLY) {
  static_assert(Pending >= 0 && Pending < 8, "cp.async.wait_group takes 0..7");
#if defined(LLMK_EMULATED)
  emu::cp_async_wait(Pending, site);
#else
  // "memory": the compiler must not move this thread's shared-memory accesses across the wait.
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

}  // namespace llmk
