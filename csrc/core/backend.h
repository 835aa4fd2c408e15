// The one place that decides which kernels run for a call, and the one owner of the error "this
// build has no CUDA kernels". A family's entry point validates its arguments, then:
//
//   run_on_backend(first_param, stream,
//       [&] { sweep_cpu(...); },                              // tensors on the CPU
//       [&](auto stream) { sweep_cuda(..., stream); });      // on a GPU, its device made current
//
// The CUDA callable is generic (`auto stream`) so that a build without CUDA never instantiates it:
// the family's CUDA launcher is declared in its header in every build but defined only in its .cu.
#pragma once
#include "core/errors.h"
#include "core/tensor.h"

#if defined(LLMK_WITH_CUDA)
#include "core/cuda_check.h"
#endif

namespace llmk {

#if defined(LLMK_WITH_CUDA)
inline constexpr bool kCudaBuilt = true;
#else
inline constexpr bool kCudaBuilt = false;
#endif

enum class Backend { cpu, cuda };

// Why a CUDA call cannot run in this build; also what cuda_unusable_reason() says in it.
inline constexpr const char* kNoCudaKernels =
    "this llmkernels build has no CUDA kernels (it was built without nvcc or with LLMK_CUDA=OFF); "
    "reinstall with nvcc on PATH, or LLMK_CUDA=ON to make that an error";

// The stream a CUDA launcher runs on (a cudaStream_t; 0 is the legacy default stream).
struct CudaStream { void* handle = nullptr; };

// The backend for tensors on `where`'s device; DeviceError when this build cannot run it.
inline Backend select_backend(const TensorView& where) {
  if (where.device == DeviceType::cpu) return Backend::cpu;
  LLMK_CHECK(where.device == DeviceType::cuda, DeviceError, where.name, " is on ", where.device_str(),
             "; llmkernels runs on CPU and CUDA devices");
  LLMK_CHECK(kCudaBuilt, DeviceError, where.name, " is on ", where.device_str(), " but ", kNoCudaKernels);
  return Backend::cuda;
}

template <typename CpuFn, typename CudaFn>
void run_on_backend(const TensorView& where, void* stream, CpuFn&& cpu, CudaFn&& cuda) {
  if (select_backend(where) == Backend::cpu) {
    cpu();
    return;
  }
#if defined(LLMK_WITH_CUDA)
  CudaDeviceGuard guard(where.device_index);
  cuda(CudaStream{stream});
#else
  (void)stream;
  (void)cuda;
#endif
}

}  // namespace llmk
