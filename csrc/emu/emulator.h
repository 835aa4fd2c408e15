// The SIMT emulator's interface: what the emulation header (emu/cuda_emu.h), the device vocabulary's
// emulated forms (common/*.h) and the launch helper (common/launch.h) call. Kernels never call it
// directly; they use CUDA's names, which cuda_emu.h maps here.
//
// Model (docs/emulator.md):
//   - a launch runs its blocks in parallel over OpenMP; the threads of a block are fibers on one OS
//     thread, each run until it reaches a barrier, a warp collective or its end (independent thread
//     scheduling at its most adversarial: a warp is never assumed to run in lockstep);
//   - the schedule of runnable threads is in order (deterministic) or a seeded shuffle per step;
//   - shared memory is one buffer per block, poisoned (0xFF bytes) at block start, with a shadow per
//     byte (written? pending cp.async? last writer and readers with their barrier epochs) that the
//     vocabulary's accessors check: out-of-bounds, read before written, read before the cp.async
//     wait, data races between barriers, and the bank conflicts of each warp-wide access;
//   - global memory accessed through the vocabulary is checked against the launch's operands;
//   - every violation, deadlock or refused launch throws EmulatorError naming the kernel, block,
//     thread and source line.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "emu/settings.h"

namespace llmk::emu {

// CUDA's dim3/uint3 (the emulated TUs alias the global names to these).
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct Index3 { unsigned x, y, z; };

// A source location, captured at the caller by a defaulted argument (LLMK_SITE in common/device.h).
struct Site {
  const char* file = "";
  int line = 0;
  static constexpr Site here(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return Site{file, line};
  }
};

// The running thread's coordinates (threadIdx & co. in cuda_emu.h read these).
struct ThreadCoordinates {
  Index3 thread_idx;
  Index3 block_idx;
  Dim3 block_dim;
  Dim3 grid_dim;
  int linear;  // thread index within the block
};
extern thread_local const ThreadCoordinates* current_coordinates;
inline const ThreadCoordinates& coordinates() { return *current_coordinates; }

// A global-memory range the running launch may touch: [begin, end).
struct MemoryRange { const void* begin; const void* end; std::string name; };

// Makes `ranges` the operands of the emulated launches in this scope (on this OS thread).
class OperandScope {
 public:
  explicit OperandScope(std::vector<MemoryRange> ranges);
  ~OperandScope();
  OperandScope(const OperandScope&) = delete;
  OperandScope& operator=(const OperandScope&) = delete;

 private:
  const std::vector<MemoryRange>* previous_;
  std::vector<MemoryRange> ranges_;
};

// Runs `body` (the kernel invocation with its arguments) for every thread of every block.
// `shared_bytes` of dynamic shared memory per block. Throws EmulatorError on a refused launch or a
// violation; returns once every block finished.
using KernelBody = void (*)(void* context);
// The opt-in dynamic shared memory of the smallest GPU the wheels target (sm_86/sm_89: 99 KB;
// sm_80 has 163 KB, sm_90 227 KB): a kernel that needs more must choose its configuration per device.
constexpr size_t kMaxDynamicSharedBytes = 101376;
void launch(const char* kernel_name, Dim3 grid, Dim3 block, size_t shared_bytes, KernelBody body,
            void* context);

// -- synchronisation ------------------------------------------------------------------------------
void syncthreads(Site site);
// The warp collective every warp-wide operation is made of: each lane in `mask` calls with its own
// input and output; the last lane to arrive runs combine(context, inputs, outputs) once with the
// inputs and outputs of all lanes (indexed by lane; null for lanes outside `mask`), then all continue.
// Reports a lane outside its own mask, lanes of one rendezvous with different operations or masks,
// and (as a deadlock) lanes that never arrive.
using CombineFn = void (*)(void* context, const void* const* inputs, void* const* outputs);
void warp_collective(const char* what, uint32_t mask, const void* input, void* output,
                     CombineFn combine, void* context, Site site);
void syncwarp(uint32_t mask, Site site);
uint32_t active_mask();  // lanes of this warp that have not exited
int lane_id();
void yield(Site site);   // a spin-wait's pause (__nanosleep): lets the block's other threads run

// -- shared memory (through the vocabulary's accessors) ---------------------------------------------
uint8_t* dynamic_shared_base();
size_t dynamic_shared_bytes();
// Checks one thread's access of `bytes` bytes at `address` (bounds, initialisation, races) and
// records it for the bank-conflict count of its warp.
void shared_read(const void* address, size_t bytes, Site site);
void shared_write(const void* address, size_t bytes, Site site);

// -- global memory (through the vocabulary's accessors) ---------------------------------------------
void global_access(const void* address, size_t bytes, bool write, Site site);
// An atomic's address: in bounds of the block's shared memory (no race check: atomics do not race)
// or of the kernel's operands.
void atomic_access(const void* address, size_t bytes, Site site);

// -- cp.async (common/cp_async.h) -----------------------------------------------------------------
// Issue: the source is bounds-checked and read now, the destination is poisoned and marked pending;
// the data lands at the wait that completes its group. A read of pending bytes is reported.
void cp_async(void* shared_destination, const void* global_source, int copy_bytes, int source_bytes,
              Site site);
void cp_async_commit();
void cp_async_wait(int pending_groups, Site site);

// Throws EmulatorError with the running kernel, block and thread prefixed to `message`.
[[noreturn]] void fail(const std::string& message, Site site);

// -- what the emulator saw (reset by reset_report) --------------------------------------------------
struct KernelReport {
  std::string kernel;
  int64_t launches = 0, blocks = 0, threads = 0;
  int64_t shared_accesses = 0;       // warp-wide shared-memory accesses seen through the vocabulary
  int64_t shared_wavefronts = 0;     // what they cost
  int64_t shared_ideal_wavefronts = 0;
  std::vector<std::pair<std::string, int64_t>> conflicts_by_site;  // "file:line" -> extra wavefronts
};
std::vector<KernelReport> report();
void reset_report();

}  // namespace llmk::emu
