// cuda_info.h for a build without CUDA (CMakeLists.txt compiles this instead of cuda_info.cu).
#include "core/backend.h"
#include "core/cuda_info.h"

namespace llmk {

CudaVersions cuda_versions() { return CudaVersions{"none", "none"}; }
int cuda_device_count() { return 0; }
std::string cuda_unusable_reason(int) { return kNoCudaKernels; }
int cuda_driver_queries() { return 0; }

}  // namespace llmk
