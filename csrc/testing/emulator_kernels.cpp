// Entry point of the emulator's test kernels (emulator_kernels.h).
#include "testing/emulator_kernels.h"

namespace llmk::testing {

void emulator_kernel(const std::string& name, const TensorView& out, const TensorView* input, void* stream) {
  out.check_contiguous();
  if (input) {
    input->check_contiguous();
    input->check_same_device(out);
  }
  run_device(out, stream, Operands().add(out).add(input),
             [&](auto device_stream) { emulator_kernel_device(name, out, input, device_stream); });
}

}  // namespace llmk::testing
