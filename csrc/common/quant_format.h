// The quantized weight formats (docs/quant.md), host+device: the CPU pack/unpack kernels, the CUDA
// kernels and the tests use these functions, so the layout is defined once.
//
// int4 weights (issue 11): W (N, K) as codes q in [0, 15], w ~ (q - z) * s with the scale s and the
// zero point z (4-bit; 8 when symmetric) of its group: column n, groups of `group_size` along K.
//
// Packed int4 layout, chosen for the W4A16 kernel's loads: one 32-bit word per lane of a warp per
// (8 columns n, 32 of k) block, blocks ordered n-block-major:
//
//   word(n, k) = ((n / 8) * k_blocks + k / 32) * 32 + lane,     k_blocks = ceil(K / 32)
//
// and inside a block, lane l = 4g + t holds exactly the elements of mma.m16n8k16's B fragment
// (common/mma.h: k = 2t, 2t + 1, 2t + 8, 2t + 9 of column n = g) for the block's two k16 halves:
//
//   nibble at bits 4r and 4r + 16, r = 2 * half16 + (k % 16) / 8:   k even (low) and k odd (high)
//
//      bits 28..31  24..27  20..23  16..19 | 12..15   8..11   4..7    0..3
//           r3 odd  r2 odd  r1 odd  r0 odd | r3 even  r2 even r1 even r0 even
//   r0 = (k 2t, 2t+1) and r1 = (k 2t+8, 2t+9) of the first k16 half, r2 and r3 of the second.
//
// So one 4-byte load per lane gives four B-fragment registers: (word >> 4r) & 0x000f000f puts
// register r's pair of codes in the low bits of two 16-bit halves, which OR 0x4300 (bf16 128.0) or
// 0x6400 (fp16 1024.0) turns into two 16-bit floats 128 + q (1024 + q) with no conversion
// instruction; one fused multiply-add by the group's scale then dequantizes both. K past the last
// multiple of 32 is padded with code 0 (the kernels never multiply those columns: x is zero there).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/float_types.h"
#include "common/hd_math.h"

namespace llmk::quant {

constexpr int kInt4BlockN = 8;    // columns of a packed block
constexpr int kInt4BlockK = 32;   // k of a packed block: two mma k16 steps

LLMK_HD int64_t int4_k_blocks(int64_t k) { return (k + kInt4BlockK - 1) / kInt4BlockK; }

// Number of 32-bit words of an (n, k) int4 matrix (n a multiple of 8).
LLMK_HD int64_t int4_packed_words(int64_t n, int64_t k) { return n / kInt4BlockN * int4_k_blocks(k) * 32; }

struct Int4Position {
  int64_t word;  // index of the 32-bit word
  int shift;     // the code sits at bits [shift, shift + 4)
};

// Where element (row n, column k) of the (N, K) code matrix lives in the packed words.
LLMK_HD Int4Position int4_position(int64_t n, int64_t k, int64_t k_blocks) {
  const int g = int(n % kInt4BlockN), c = int(k % kInt4BlockK);
  const int half16 = c / 16, within = c % 16;
  const int upper = within / 8, t = (within % 8) / 2, odd = within % 2;
  const int lane = 4 * g + t;
  const int r = 2 * half16 + upper;
  return Int4Position{((n / kInt4BlockN) * k_blocks + k / kInt4BlockK) * 32 + lane, 4 * r + 16 * odd};
}

// The inverse, inside one block: nibble `shift / 4` (register r = shift / 4 % 4, odd = shift / 16) of
// lane `lane`'s word is row lane / 4, column 8r + 2 (lane % 4) + odd of the block.
LLMK_HD int int4_block_column(int lane, int shift) {
  return 8 * ((shift / 4) % 4) + 2 * (lane % 4) + shift / 16;
}

// NaN-propagating max and min (a NaN anywhere in a reduction makes its result NaN).
LLMK_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
LLMK_HD float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }

// int4 quantization of one group (llmkernels.quant.quantize_int4's arithmetic, so the CPU kernel, the
// CUDA kernel and torch's ops give the same bits): from the group's min, max and max |w| in float32,
//   symmetric:  s = max|w| / 7,                  z = 8
//   asymmetric: s = (max(hi, 0) - min(lo, 0)) / 15,  z = clamp(round-half-even(-min(lo, 0) / s), 0, 15)
// with s = 1 for an all-zero group and s rounded *up* to the 16-bit scale type (never below the float32
// value, so the group's extremes stay inside the code range); z uses the rounded s. A group holding a
// NaN (min, max and max|w| NaN) gets s = 1 and z = 0 (8 symmetric), and a NaN weight code 0: the bits
// of the torch formula (llmkernels.reference.quant.quantize_int4) on x86.
struct Int4Group {
  uint16_t scale_bits;  // of the 16-bit scale type
  float scale;          // the same value as a float
  int zero;
};

template <typename S>
LLMK_HD Int4Group int4_group(float low, float high, float absmax, bool symmetric) {
  const float lo = low < 0.0f ? low : 0.0f, hi = high > 0.0f ? high : 0.0f;
  float s = symmetric ? div_rn(absmax, 7.0f) : div_rn(hi - lo, 15.0f);
  if (!(s > 0.0f)) s = 1.0f;
  uint16_t bits = from_float<S>(s).bits;
  if (to_float(S{bits}) < s) ++bits;   // the next 16-bit value up (s is positive and finite)
  const float rounded = to_float(S{bits});
  int zero = 8;
  if (!symmetric) {
    const float z = rint(div_rn(-lo, rounded));
    zero = int(z < 0.0f ? 0.0f : (z > 15.0f ? 15.0f : z));
  }
  return Int4Group{bits, rounded, zero};
}

// The code of w in its group: clamp(round-half-even(w / s) + z, 0, 15), the division in double.
LLMK_HD uint32_t int4_code(float w, float scale, int zero) {
  const double q = rint(double(w) / double(scale)) + double(zero);
  if (q != q) return 0;
  return uint32_t(q < 0.0 ? 0.0 : (q > 15.0 ? 15.0 : q));
}

// Symmetric int8 (weights per output channel, activations per token): scale = max|v| / 127 in float
// (1 for an all-zero row), code = round-half-even(v / scale) in double, clamped to [-127, 127]: the
// arithmetic of llmkernels.quant's weight quantization, so the CPU and CUDA kernels give its bits.
// A row holding a NaN gets a NaN scale (and codes 0), so its outputs are NaN, not finite garbage.
LLMK_HD float int8_scale(float absmax) {
  const float scale = div_rn(absmax, 127.0f);
  return scale > 0.0f || scale != scale ? scale : 1.0f;
}
LLMK_HD int8_t int8_code(float v, float scale) {
  const double q = rint(double(v) / double(scale));
  if (q != q) return 0;
  return int8_t(q > 127.0 ? 127.0 : (q < -127.0 ? -127.0 : q));
}

}  // namespace llmk::quant
