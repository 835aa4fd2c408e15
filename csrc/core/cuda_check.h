// CUDA error checking and device selection. Every CUDA API call is wrapped in LLMK_CUDA_CHECK and
// every kernel launch is followed by LLMK_CUDA_CHECK_LAUNCH().
#pragma once
#include <cuda_runtime.h>

#include "core/errors.h"

#define LLMK_CUDA_CHECK(expr)                                                                  \
  do {                                                                                         \
    const cudaError_t llmk_status_ = (expr);                                                   \
    if (llmk_status_ != cudaSuccess)                                                           \
      throw ::llmk::DeviceError(::llmk::detail::concat(#expr, " failed: ",                     \
                                                       cudaGetErrorString(llmk_status_), " (", \
                                                       __FILE__, ":", __LINE__, ")"));         \
  } while (0)

#define LLMK_CUDA_CHECK_LAUNCH() LLMK_CUDA_CHECK(cudaGetLastError())

namespace llmk {

// Makes `device` current for the scope and restores the previous device after it.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    LLMK_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) LLMK_CUDA_CHECK(cudaSetDevice(device));
  }
  ~CudaDeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace llmk
