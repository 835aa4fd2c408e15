// Standard normal numbers from Philox4x32-10, bit-identical on host and device.
//
// The contract (docs/mezo.md): z for element j of tensor i under seed s is
//   key     = mix_seed(s)                      (64 bits: key0 = low word, key1 = high word)
//   counter = (g mod 2^32, g >> 32, i, 0)     with g = j / 4 (j's group of four)
//   x0..x3  = philox4x32_10(counter, key)
//   (z[4g], z[4g+1])   = box_muller(x0, x1)
//   (z[4g+2], z[4g+3]) = box_muller(x2, x3)
// box_muller(a, b) = r * (cos t, sin t) with r = sqrt(-2 ln u), u = (2 (a >> 9) + 1) / 2^24 in
// (0, 1), and t = 2 pi (b >> 8 + 1/2) / 2^24. So |z| <= sqrt(-2 ln 2^-24) = 5.77: the tails
// beyond 5.77 sigma (probability 8e-9) are cut.
//
// Every float operation is one IEEE round-to-nearest operation (common/hd_math.h) and log, sin
// and cos are evaluated here by polynomials, so the CPU and the GPU produce the same bits.
// Accuracy against float64 Box-Muller on the same integers: a few ulp (tests/test_mezo.py).
#pragma once
#include <cstdint>

#include "common/hd_math.h"
#include "common/philox.h"

namespace llmk {

// ln(u) for u = (2 (a >> 9) + 1) / 2^24. Argument reduction u = m 2^e with m in [sqrt(1/2),
// sqrt(2)), then ln(m) = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.1716, as the odd series
// 2 (s + s^3/3 + ... + s^9/9) (truncation error below 1e-9).
LLMK_HD float log_unit_interval(uint32_t a) {
  const float u = mul_rn(float(((a >> 9) << 1) | 1u), 5.9604644775390625e-08f);  // exact
  const uint32_t bits = float_bits(u);
  int exponent = int(bits >> 23) - 127;
  float m = bits_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool halve = m > 1.41421356f;
  m = halve ? mul_rn(m, 0.5f) : m;
  exponent += halve ? 1 : 0;
  const float f = add_rn(m, -1.0f);  // exact (Sterbenz)
  const float s = div_rn(f, add_rn(f, 2.0f));
  const float s2 = mul_rn(s, s);
  float p = add_rn(mul_rn(s2, 0.11111111f), 0.14285715f);
  p = add_rn(mul_rn(s2, p), 0.2f);
  p = add_rn(mul_rn(s2, p), 0.33333334f);
  p = mul_rn(s2, p);
  const float two_s = add_rn(s, s);
  const float log_m = add_rn(two_s, mul_rn(two_s, p));
  const float e = float(exponent);
  constexpr float kLn2Hi = 0.693145751953125f;      // 0x3f317200: e * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860676533018e-06f;  // ln 2 - kLn2Hi
  return add_rn(mul_rn(e, kLn2Hi), add_rn(mul_rn(e, kLn2Lo), log_m));
}

// (cos t, sin t) for t = 2 pi (v + 1/2) / 2^24 with v = b >> 8. The quadrant comes from the top
// bits of v, so the polynomial argument x = t - n pi/2 stays in [-pi/4, pi/4], where Taylor
// series to x^9 (sin) and x^10 (cos) are accurate to 2e-9.
LLMK_HD void cos_sin_turn(uint32_t b, float& cos_t, float& sin_t) {
  const int32_t v = int32_t(b >> 8);
  const int32_t quadrant_start = (v + (1 << 21)) >> 22;  // nearest multiple of 2^22 (0..4)
  const int32_t remainder = v - (quadrant_start << 22);  // [-2^21, 2^21)
  const int quadrant = quadrant_start & 3;
  const float x = mul_rn(add_rn(float(remainder), 0.5f), 3.74507028e-07f);  // 2 pi / 2^24
  const float x2 = mul_rn(x, x);
  float sp = add_rn(mul_rn(x2, 2.75573192e-06f), -1.98412698e-04f);
  sp = add_rn(mul_rn(x2, sp), 8.33333377e-03f);
  sp = add_rn(mul_rn(x2, sp), -0.166666672f);
  const float sin_x = add_rn(x, mul_rn(mul_rn(x, x2), sp));
  float cp = add_rn(mul_rn(x2, -2.75573192e-07f), 2.48015876e-05f);
  cp = add_rn(mul_rn(x2, cp), -1.38888892e-03f);
  cp = add_rn(mul_rn(x2, cp), 4.16666679e-02f);
  cp = add_rn(mul_rn(x2, cp), -0.5f);
  const float cos_x = add_rn(1.0f, mul_rn(x2, cp));
  // rotate by quadrant * pi/2
  const float c = (quadrant & 1) ? sin_x : cos_x;
  const float s = (quadrant & 1) ? cos_x : sin_x;
  cos_t = (quadrant == 1 || quadrant == 2) ? -c : c;
  sin_t = (quadrant >= 2) ? -s : s;
}

LLMK_HD void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float radius = sqrt_rn(mul_rn(-2.0f, log_unit_interval(a)));
  float cos_t, sin_t;
  cos_sin_turn(b, cos_t, sin_t);
  z0 = mul_rn(radius, cos_t);
  z1 = mul_rn(radius, sin_t);
}

struct Normal4 { float z[4]; };

// The key for a seed, split into Philox's two key words.
struct PhiloxKey {
  uint32_t k0, k1;
  LLMK_HD static PhiloxKey from_seed(uint64_t seed) {
    const uint64_t mixed = mix_seed(seed);
    return PhiloxKey{uint32_t(mixed), uint32_t(mixed >> 32)};
  }
};

// z[4 group .. 4 group + 3] of tensor `tensor_index`.
LLMK_HD Normal4 normal4(PhiloxKey key, uint32_t tensor_index, uint64_t group) {
  const Philox4 bits = philox4x32_10(
      Philox4{{uint32_t(group), uint32_t(group >> 32), tensor_index, 0u}}, key.k0, key.k1);
  Normal4 out;
  box_muller(bits.x[0], bits.x[1], out.z[0], out.z[1]);
  box_muller(bits.x[2], bits.x[3], out.z[2], out.z[3]);
  return out;
}

}  // namespace llmk
