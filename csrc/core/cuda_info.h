// What the CUDA runtime and driver say about this machine, for build_info() and the "is CUDA usable"
// answer. Declared in every build; defined in cuda_info.cu, or in cuda_info_none.cpp for a build
// without CUDA (answers without a driver). Nothing here runs at
// import: loading the module must not initialise the driver (forked DataLoader workers, import time).
#pragma once
#include <string>

namespace llmk {

struct CudaVersions {
  std::string runtime;  // "13.0"
  std::string driver;   // "13.0", or "none" without a driver
};
CudaVersions cuda_versions();

int cuda_device_count();  // 0 without a driver or a GPU (the runtime's error is cleared)

// "" when this build's kernels can run on `device`; otherwise why not (no such device, or no
// kernel image for its architecture, e.g. a build for sm_90a on an A100).
std::string cuda_unusable_reason(int device);

// How many of the functions above have run in this process: a test checks that import runs none.
int cuda_driver_queries();

}  // namespace llmk
