// MeZO (Malladi et al. 2023): zeroth-order parameter sweeps driven by a counter-based generator.
//
// Every MeZO operation is one sweep over a list of parameter tensors. For element j of tensor k
// (whose generator index is index[k]):
//
//   theta <- theta + [(coef_a[k] - coef_b[k] * g) * z(seed, index[k], j) - shrink[k] * theta
//                     + next_scale * z(next_seed, index[k], j)]                (if has_next)
//
// in float32, whatever the parameter dtype. With g = projected gradient:
//   perturb by scale:         shrink = 0,         coef_a = scale,                coef_b = 0
//   restore + SGD update:     shrink = lr * wd,   coef_a = eps * (1 - lr * wd),  coef_b = lr
//   ... and next step's +eps: has_next, next_scale = eps
// The small correction in brackets is summed first and added to theta last: one rounding at
// theta's magnitude, so the fused update is as accurate as restore-then-update in two sweeps.
// z(s, i, j) is defined in common/gaussian.h. Seeds and g are each a value or a pointer to one
// element on the parameters' device (an int64 seed, a float32 g), read by the kernel: a step then
// needs no host synchronization, and a CUDA-graph replay sees the current seed and g.
//
// A non-finite g (a NaN or infinite loss difference) skips the update, as torch.amp.GradScaler
// skips a step with non-finite gradients: every tensor then gets theta + restore_scale * z (the
// restore alone: shrink 0, coefficient restore_scale), plus the next perturbation if any. The
// kernel decides from g itself, so a device-resident g needs no host synchronization.
#pragma once
#include <cstdint>
#include <vector>

#include "common/float_types.h"
#include "common/gaussian.h"
#include "common/scalar_arg.h"
#include "core/backend.h"
#include "core/tensor.h"

namespace llmk::mezo {

struct SweepTensor {
  void* data;
  int64_t numel;
  uint32_t index;  // generator stream of this tensor
  float shrink, coef_a, coef_b;
};

// Seeds are 64-bit patterns: an int64 value or tensor element is read as its two's-complement uint64.
struct SweepScalars {
  ScalarArg<uint64_t, int64_t> seed;
  ScalarArg<float> grad;
  float restore_scale = 0.0f;  // the coefficient of z when g is not finite
  bool has_next = false;
  ScalarArg<uint64_t, int64_t> next_seed;
  float next_scale = 0.0f;
};

// The per-tensor coefficient of z and the per-element update, shared by the CPU and CUDA kernels
// and rounded identically on both (common/hd_math.h: no FMA), so a sweep's result is the same
// bits on CPU and CUDA, not only its z. Three extra float instructions per element on the GPU.
LLMK_HD float sweep_coefficient(float coef_a, float coef_b, float grad) {
  return add_rn(coef_a, -mul_rn(coef_b, grad));
}

// A tensor's (shrink, coefficient of z) for this sweep: the update's, or the restore's when g is
// not finite.
struct TensorCoefficients { float shrink, coef; };

LLMK_HD TensorCoefficients sweep_coefficients(float shrink, float coef_a, float coef_b, float grad,
                                               float restore_scale) {
  if (!is_finite(grad)) return TensorCoefficients{0.0f, restore_scale};
  return TensorCoefficients{shrink, sweep_coefficient(coef_a, coef_b, grad)};
}

LLMK_HD float sweep_element(float theta, float shrink, float coef, float z, float next_scale,
                            float z_next) {
  const float correction = add_rn(add_rn(mul_rn(coef, z), -mul_rn(shrink, theta)), mul_rn(next_scale, z_next));
  return add_rn(theta, correction);
}

// Entry point: validates the views (every check before any kernel runs), groups them by dtype and
// runs the CPU or CUDA kernel. Parameters may have any dense layout (row-major, channels_last, ...):
// the sweep runs over memory order, and element j of a tensor is the j-th element in memory.
// `stream` is a cudaStream_t (unused on CPU). The scalar tensors may be null (use the values).
void sweep(const std::vector<TensorView>& params, const std::vector<int64_t>& indices,
           const std::vector<double>& shrink, const std::vector<double>& coef_a,
           const std::vector<double>& coef_b, SweepScalars scalars, const TensorView* seed_tensor,
           const TensorView* grad_tensor, const TensorView* next_seed_tensor, void* stream);

// The kernels, one call per dtype; their device is current when called. sweep_device is
// mezo_cuda.cu: compiled by nvcc (CudaStream) and by the host compiler for the emulator (EmuStream).
void sweep_cpu(DType dtype, const std::vector<SweepTensor>& tensors, const SweepScalars& scalars);
void sweep_device(DType dtype, const std::vector<SweepTensor>& tensors, const SweepScalars& scalars,
                  CudaStream stream);
void sweep_device(DType dtype, const std::vector<SweepTensor>& tensors, const SweepScalars& scalars,
                  EmuStream stream);

}  // namespace llmk::mezo
