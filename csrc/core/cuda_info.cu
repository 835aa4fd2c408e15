#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "core/cuda_check.h"
#include "core/cuda_info.h"

namespace llmk {
namespace {

std::atomic<int> driver_queries{0};

// Compiled like every kernel of the build: if the driver finds no image of it for a device, it
// finds none of the others either.
__global__ void probe_kernel() {}

std::string version_string(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

}  // namespace

int cuda_driver_queries() { return driver_queries.load(); }

CudaVersions cuda_versions() {
  ++driver_queries;
  int runtime = 0, driver = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  return CudaVersions{version_string(runtime), driver ? version_string(driver) : "none"};
}

int cuda_device_count() {
  ++driver_queries;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) {
    devices = 0;
    cudaGetLastError();  // clear the error a machine without a GPU or driver reports
  }
  return devices;
}

std::string cuda_unusable_reason(int device) {
  const int devices = cuda_device_count();
  if (devices == 0) return "no CUDA device or driver found by the CUDA runtime";
  if (device < 0 || device >= devices)
    return "cuda:" + std::to_string(device) + " does not exist (" + std::to_string(devices) + " devices)";
  int major = 0, minor = 0;
  LLMK_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  LLMK_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  CudaDeviceGuard guard(device);
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (status == cudaSuccess) return "";
  cudaGetLastError();
  const std::string arch = "sm_" + std::to_string(major) + std::to_string(minor);
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction)
    return "this llmkernels build has no kernel image for cuda:" + std::to_string(device) + " (" + arch +
           "; built for " + LLMK_CUDA_ARCHS_STR + "): install a release wheel (sm_80, sm_86, sm_89, sm_90a "
           "and PTX for newer GPUs; README: Install), or rebuild from source with LLMK_CUDA_ARCHS including " +
           std::to_string(major) + std::to_string(minor);
  return "cuda:" + std::to_string(device) + " (" + arch + ") cannot run this build's kernels: " +
         cudaGetErrorString(status);
}

}  // namespace llmk
