// bfloat16 and float16 storage types with float conversions that agree on host and device.
// Conversions to the 16-bit types round to nearest even, like torch's `.to()`.
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/hd_math.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace llmk {

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

LLMK_HD float to_float(float x) { return x; }
LLMK_HD float to_float(bf16 x) { return bits_float(uint32_t(x.bits) << 16); }

LLMK_HD float to_float(f16 x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

template <typename T> LLMK_HD T from_float(float x);

template <> LLMK_HD float from_float<float>(float x) { return x; }

template <> LLMK_HD bf16 from_float<bf16>(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

template <> LLMK_HD f16 from_float<f16>(float x) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(x))};
#else
  const uint32_t u = float_bits(x);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};   // NaN
  if (magnitude >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds to infinity
  if (magnitude < 0x38800000u) {  // below 2^-14: a float16 subnormal, round(|x| * 2^24) to even
    const float scaled = bits_float(magnitude) * 16777216.0f;            // exact
    const float rounded = (scaled + 8388608.0f) - 8388608.0f;             // RNE to an integer
    return f16{uint16_t(sign | uint16_t(rounded))};
  }
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return f16{uint16_t(sign | ((rounded - 0x38000000u) >> 13))};
#endif
}

// Two floats rounded to T and packed in one 32-bit register, `lo` in the low half: an mma A or B
// fragment register (common/mma.h). One cvt.rn.*x2.f32 on the device; the same bits on the host.
template <typename T>
LLMK_HD uint32_t pack_pair(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, f16>, "pack_pair packs bf16 or f16");
  if constexpr (std::is_same_v<T, bf16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
#else
  return uint32_t(from_float<T>(lo).bits) | (uint32_t(from_float<T>(hi).bits) << 16);
#endif
}

}  // namespace llmk
