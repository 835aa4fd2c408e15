// Whether CPU tensors run the native CPU kernels or the CUDA kernels under the SIMT emulator, and
// how the emulator schedules threads. Process-wide (the tests switch it around a call; see
// llmkernels/emulator.py).
#pragma once
#include <cstdint>

namespace llmk::emu {

enum class Schedule {
  ordered,   // threads in index order, each until it blocks: deterministic
  shuffled,  // a seeded random order of the runnable threads at every step (per block)
};

struct Settings {
  bool enabled = false;  // CPU tensors run the emulated CUDA kernels instead of the CPU kernels
  Schedule schedule = Schedule::ordered;
  uint64_t seed = 0;     // of the shuffled schedule
};

Settings settings();
void set_settings(const Settings& settings);

}  // namespace llmk::emu
