// The SIMT emulator's own test kernels (emulator_kernels.cu): small CUDA kernels, correct ones with
// deterministic outputs (compared bit for bit with an independent model, and between the emulator
// and a GPU by bench/gpu_check.sh) and deliberately buggy ones that the emulator must report
// (tests/test_emulator.py). One kernel per name:
//
//   correct:  tile_normalize, warp_ops, atomics, coordinates, warp_exchange, bank_conflicts
//   buggy:    race_missing_syncthreads, tile_normalize_no_trailing_barrier, poison_read,
//             shared_out_of_bounds, global_off_by_one, divergent_syncthreads,
//             barrier_after_early_return, shuffle_missing_lanes, shuffle_mask_excludes_lane,
//             collective_mismatch, launch_too_many_threads, launch_too_much_shared
//
// The shapes each kernel takes are checked by its launcher (see the table in emulator_kernels.cu).
#pragma once
#include <string>

#include "core/backend.h"
#include "core/tensor.h"

namespace llmk::testing {

// Entry point (emulator_kernels.cpp): CPU tensors run the kernel under the emulator (whatever the
// emulation setting), CUDA tensors on the GPU. `input` may be null. `stream` is a cudaStream_t.
void emulator_kernel(const std::string& name, const TensorView& out, const TensorView* input, void* stream);

// The launchers: emulator_kernels.cu compiled by nvcc (CudaStream) and for the emulator (EmuStream).
void emulator_kernel_device(const std::string& name, const TensorView& out, const TensorView* input,
                            CudaStream stream);
void emulator_kernel_device(const std::string& name, const TensorView& out, const TensorView* input,
                            EmuStream stream);

}  // namespace llmk::testing
