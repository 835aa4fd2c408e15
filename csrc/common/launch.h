// The one way a kernel is launched: `<<<grid, block, shared, stream>>>` under nvcc, followed by the
// launch-error check, and the emulator's launch under the host compiler (LLMK_EMULATED).
//
//   launch("mezo sweep", sweep_kernel<T>, LaunchShape{grid, kThreads}, stream, batch, scalars);
//
// A launch with an empty grid does nothing (CUDA would refuse it). Dynamic shared memory above
// 48 KB is opted into here (cudaFuncAttributeMaxDynamicSharedMemorySize).
#pragma once
#include <cstddef>
#include <tuple>
#include <utility>

#include "common/device.h"
#if !defined(LLMK_EMULATED)
#include "core/cuda_check.h"
#endif

namespace llmk {

struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
};

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), LaunchShape shape, DeviceStream stream, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch: the kernel takes a different number of arguments");
  if (shape.grid.x == 0 || shape.grid.y == 0 || shape.grid.z == 0) return;
#if defined(LLMK_EMULATED)
  (void)stream;
  // Every thread calls the kernel with its own copies of the arguments, as kernel parameters are.
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> arguments;
  } call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  auto body = [](void* context) {
    const Call& c = *static_cast<const Call*>(context);
    std::apply([&](const auto&... a) { c.kernel(a...); }, c.arguments);
  };
  emu::launch(name, shape.grid, shape.block, shape.shared_bytes, body, &call);
#else
  constexpr size_t kDefaultSharedLimit = 48 * 1024;
  if (shape.shared_bytes > kDefaultSharedLimit)
    LLMK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shape.shared_bytes)));
  kernel<<<shape.grid, shape.block, shape.shared_bytes, static_cast<cudaStream_t>(stream.handle)>>>(
      std::forward<Args>(args)...);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess)
    throw DeviceError(detail::concat("launch of kernel '", name, "' (grid ", shape.grid.x, "x", shape.grid.y, "x",
                                     shape.grid.z, ", block ", shape.block.x, "x", shape.block.y, "x", shape.block.z,
                                     ", ", shape.shared_bytes, " bytes of shared memory) failed: ",
                                     cudaGetErrorString(status)));
#endif
}

}  // namespace llmk
