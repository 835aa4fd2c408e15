// The one place that decides which kernels run for a call, and the one owner of the error "this
// build has no CUDA kernels". A family's entry point validates its arguments, then:
//
//   run_on_backend(first_param, stream, Operands().add(params).add(scale),
//       [&] { sweep_cpu(...); },                              // tensors on the CPU
//       [&](auto stream) { sweep_device(..., stream); });    // the .cu file's launcher
//
// The device callable is generic (`auto stream`): with a CudaStream it calls the nvcc-compiled
// launcher (on a GPU, its device made current); with an EmuStream the same source compiled by the
// host compiler against the SIMT emulator, on CPU tensors (when emulation is switched on:
// emu/settings.h). A build without CUDA never instantiates the CUDA call: the launcher is declared
// in the family's header in every build but defined only in its .cu file.
// `Operands` are the tensors the kernel may touch: the emulator checks the kernel's global accesses
// against them.
#pragma once
#include <vector>

#include "core/errors.h"
#include "core/tensor.h"
#include "emu/emulator.h"

// (An emulated kernel file includes this without the CUDA toolkit's headers: LLMK_EMULATED.)
#if defined(LLMK_WITH_CUDA) && !defined(LLMK_EMULATED)
#define LLMK_CUDA_RUNTIME_HERE 1
#include "core/cuda_check.h"
#endif

namespace llmk {

#if defined(LLMK_WITH_CUDA)
inline constexpr bool kCudaBuilt = true;
#else
inline constexpr bool kCudaBuilt = false;
#endif

enum class Backend { cpu, emu, cuda };

// Why a CUDA call cannot run in this build; also what cuda_unusable_reason() says in it.
inline constexpr const char* kNoCudaKernels =
    "this llmkernels build has no CUDA kernels (it was built without nvcc or with LLMK_CUDA=OFF): "
    "install a release wheel (README: Install; tools/build_wheels.sh builds them), or reinstall from "
    "source with nvcc on PATH (LLMK_CUDA=ON makes a build without it an error)";

// The stream a CUDA launcher runs on (a cudaStream_t; 0 is the legacy default stream).
struct CudaStream { void* handle = nullptr; };
// The emulated backend's "stream": launches run synchronously on the calling thread's CPUs.
struct EmuStream {};

// The tensors a kernel reads or writes, for the emulator's global-memory bounds.
class Operands {
 public:
  Operands& add(const TensorView& view) { views_.push_back(&view); return *this; }
  Operands& add(const TensorView* view) { if (view) views_.push_back(view); return *this; }
  Operands& add(const std::vector<TensorView>& views) {
    for (const TensorView& v : views) views_.push_back(&v);
    return *this;
  }
  // [lowest, highest + 1 element) of each view's bytes.
  std::vector<emu::MemoryRange> ranges() const {
    std::vector<emu::MemoryRange> out;
    for (const TensorView* v : views_) {
      if (v->numel() == 0) continue;
      int64_t last = 0;
      for (int d = 0; d < v->ndim; ++d) last += (v->shape[d] - 1) * v->strides[d];
      const auto* begin = static_cast<const uint8_t*>(v->ptr);
      out.push_back(emu::MemoryRange{begin, begin + (last + 1) * dtype_size(v->dtype), v->name});
    }
    return out;
  }

 private:
  std::vector<const TensorView*> views_;
};

// The backend for tensors on `where`'s device; DeviceError when this build cannot run it.
// CPU tensors run the CPU kernels, or the emulated CUDA kernels while emulation is on.
inline Backend select_backend(const TensorView& where) {
  if (where.device == DeviceType::cpu) return emu::settings().enabled ? Backend::emu : Backend::cpu;
  LLMK_CHECK(where.device == DeviceType::cuda, DeviceError, where.name, " is on ", where.device_str(),
             "; llmkernels runs on CPU and CUDA devices");
  LLMK_CHECK(kCudaBuilt, DeviceError, where.name, " is on ", where.device_str(), " but ", kNoCudaKernels);
  return Backend::cuda;
}

// The CUDA kernels only: on a GPU for CUDA tensors, under the emulator for CPU tensors, whatever the
// emulation setting (the vocabulary's and the emulator's own test kernels, csrc/testing/).
template <typename DeviceFn>
void run_device(const TensorView& where, void* stream, const Operands& operands, DeviceFn&& device) {
  if (where.device == DeviceType::cpu) {
    emu::OperandScope scope(operands.ranges());
    device(EmuStream{});
    return;
  }
  select_backend(where);  // DeviceError for other devices, and for CUDA tensors in a build without CUDA
#if defined(LLMK_CUDA_RUNTIME_HERE)
  CudaDeviceGuard guard(where.device_index);
  device(CudaStream{stream});
#else
  (void)stream;
#endif
}

template <typename CpuFn, typename DeviceFn>
void run_on_backend(const TensorView& where, void* stream, const Operands& operands, CpuFn&& cpu,
                    DeviceFn&& device) {
  if (select_backend(where) == Backend::cpu) {
    cpu();
    return;
  }
  run_device(where, stream, operands, device);  // emulated (CPU tensors) or CUDA
}

}  // namespace llmk
