// Host+device arithmetic that rounds identically on the CPU and the GPU.
//
// The random numbers (common/gaussian.h) must be bit-identical on both sides, so every float
// operation they use is one IEEE round-to-nearest operation:
//   - no FMA contraction: on the device the __f*_rn intrinsics are never contracted; on the host
//     the build passes -ffp-contract=off (CMakeLists.txt), so `a * b + c` is two roundings;
//   - division and square root are the correctly rounded IEEE ones (__fdiv_rn/__fsqrt_rn on the
//     device, / and std::sqrt on the host), never the approximate fast-math forms;
//   - no libm transcendental functions (glibc's and CUDA's logf/sinf differ in the last bit);
//     gaussian.h evaluates its own polynomials with the operations above.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LLMK_HD __host__ __device__ __forceinline__
#else
#define LLMK_HD inline
#endif

// Fully unrolls a short fixed-trip loop on either compiler.
#if defined(__CUDACC__)
#define LLMK_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LLMK_UNROLL _Pragma("GCC unroll 16")
#else
#define LLMK_UNROLL
#endif

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace llmk {

LLMK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LLMK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

LLMK_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

LLMK_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

LLMK_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

LLMK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Neither infinite nor NaN, from the bits (the same answer on both sides, whatever the math flags).
LLMK_HD bool is_finite(float x) { return (float_bits(x) & 0x7f800000u) != 0x7f800000u; }

}  // namespace llmk
