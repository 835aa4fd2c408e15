// The base of every .cu file: CUDA's names, from the toolkit under nvcc or from the SIMT emulator
// when the host compiler builds the same file for the emulated backend (LLMK_EMULATED; see
// docs/emulator.md). Device helpers are LLMK_DEVICE; a vocabulary function that the emulator checks
// takes LLMK_SITE last, so its reports name the kernel's line, and costs nothing under nvcc.
#pragma once
#include <cstdint>

#if defined(LLMK_EMULATED)
#include "emu/cuda_emu.h"
#define LLMK_DEVICE inline
#define LLMK_SITE , ::llmk::emu::Site site = ::llmk::emu::Site::here()
#define LLMK_SITE_ONLY ::llmk::emu::Site site = ::llmk::emu::Site::here()
#else
#include <cuda_runtime.h>
#define LLMK_DEVICE __device__ __forceinline__
#define LLMK_SITE
#define LLMK_SITE_ONLY
#endif

#include "common/hd_math.h"
#include "core/backend.h"

namespace llmk {

// The stream type a .cu file's launchers take: its two compilations are two overloads of each
// launcher (CudaStream under nvcc, EmuStream under the emulator), declared side by side in the
// family's header and called by run_on_backend with the backend's stream.
#if defined(LLMK_EMULATED)
using DeviceStream = EmuStream;
#else
using DeviceStream = CudaStream;
#endif

// Dynamic shared memory (`extern __shared__`), 16-byte aligned: the kernels' one shared buffer.
// Under the emulator it is the block's poisoned, shadowed buffer.
LLMK_DEVICE uint8_t* dynamic_shared_memory() {
#if defined(LLMK_EMULATED)
  return ::llmk::emu::dynamic_shared_base();
#else
  extern __shared__ __align__(16) uint8_t llmk_dynamic_shared[];
  return llmk_dynamic_shared;
#endif
}

}  // namespace llmk
