// Warp-level tensor-core multiply-accumulate, mma.sync (sm_80+), and its fragment layouts (PTX ISA,
// "Matrix Fragments for mma.m16n8k16" and "for mma.m16n8k32"):
//
//   mma_m16n8k16<bf16 or f16>(d, a, b, c):  D (16x8, f32) = A (16x16) * B (16x8) + C (16x8, f32)
//   mma_m16n8k32_s8(d, a, b, c):            D (16x8, s32) = A (16x32, s8) * B (32x8, s8) + C (s32)
//
// Each lane holds a fixed part of each matrix. With groupID g = lane / 4 and t = lane % 4:
//   A, 16-bit: 4 registers of 2 elements: (row g, cols 2t..2t+1), (row g+8, same cols),
//              (row g, cols 2t+8..2t+9), (row g+8, cols 2t+8..2t+9)
//   A, int8:   4 registers of 4 elements: (row g, cols 4t..4t+3), (row g+8, ...), then cols +16
//   B, 16-bit: 2 registers of 2 elements: (rows k = 2t..2t+1, col g), (rows 2t+8..2t+9, col g)
//   B, int8:   2 registers of 4 elements: (rows k = 4t..4t+3, col g), (rows 4t+16..4t+19, col g)
//   C/D:       4 values: (row g, cols 2t, 2t+1), (row g+8, cols 2t, 2t+1)
// The lower-indexed element sits in the lower bits of a register. The coordinate functions below are
// that table as code (host+device, so tests check them against the PTX ISA's table on the CPU), and
// the emulated mma gathers the matrices with them.
//
// So for C = X Wᵀ with X (m, k) and W (n, k) both row-major in shared memory, A's fragment is what
// ldmatrix.x4 gives for X's 16x16 block and B's fragment what ldmatrix gives for W's rows (no .trans):
// W's row is B's column.
//
// Emulated: the product is exact (products of 16-bit or int8 inputs are exact; the sum is taken in
// double and rounded once to float). The tensor cores truncate their internal sums differently, so
// floating-point results agree with the hardware to a tolerance only; integer results agree exactly
// (s32 accumulation wraps modulo 2^32, as the hardware's without .satfinite).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/device.h"
#include "common/float_types.h"

namespace llmk {

struct FragmentCoord { int row, col; };

// Element `i` (0..7) of lane `lane`'s A fragment (16-bit types): register i / 2, half i % 2.
LLMK_HD FragmentCoord mma_a_coord_16bit(int lane, int i) {
  const int g = lane / 4, t = lane % 4;
  return FragmentCoord{g + 8 * ((i / 2) % 2), 2 * t + (i % 2) + 8 * (i / 4)};
}
// Element `i` (0..3) of the B fragment (16-bit types), as (k, n).
LLMK_HD FragmentCoord mma_b_coord_16bit(int lane, int i) {
  const int g = lane / 4, t = lane % 4;
  return FragmentCoord{2 * t + (i % 2) + 8 * (i / 2), g};
}
// Element `i` (0..15) of the A fragment (int8): register i / 4, byte i % 4.
LLMK_HD FragmentCoord mma_a_coord_s8(int lane, int i) {
  const int g = lane / 4, t = lane % 4;
  return FragmentCoord{g + 8 * ((i / 4) % 2), 4 * t + (i % 4) + 16 * (i / 8)};
}
// Element `i` (0..7) of the B fragment (int8), as (k, n).
LLMK_HD FragmentCoord mma_b_coord_s8(int lane, int i) {
  const int g = lane / 4, t = lane % 4;
  return FragmentCoord{4 * t + (i % 4) + 16 * (i / 4), g};
}
// Element `i` (0..3) of the C/D fragment (f32 or s32).
LLMK_HD FragmentCoord mma_c_coord(int lane, int i) {
  const int g = lane / 4, t = lane % 4;
  return FragmentCoord{g + 8 * (i / 2), 2 * t + (i % 2)};
}

namespace detail {
#if defined(LLMK_EMULATED)
struct MmaFragmentsF32 { uint32_t a[4], b[2]; float c[4]; };
struct MmaFragmentsS32 { uint32_t a[4], b[2]; int32_t c[4]; };

inline float half_bits_to_float(uint16_t bits, bool is_bf16) {
  return is_bf16 ? to_float(bf16{bits}) : to_float(f16{bits});
}

template <bool IsBf16>
void mma_16bit_combine(void*, const void* const* inputs, void* const* outputs) {
  for (int lane = 0; lane < 32; ++lane)
    if (!inputs[lane]) emu::fail("mma.sync needs all 32 lanes; a lane has exited", emu::Site::here());
  double a[16][16], b[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto& in = *static_cast<const MmaFragmentsF32*>(inputs[lane]);
    for (int i = 0; i < 8; ++i) {
      const FragmentCoord p = mma_a_coord_16bit(lane, i);
      a[p.row][p.col] = half_bits_to_float(uint16_t(in.a[i / 2] >> (16 * (i % 2))), IsBf16);
    }
    for (int i = 0; i < 4; ++i) {
      const FragmentCoord p = mma_b_coord_16bit(lane, i);
      b[p.row][p.col] = half_bits_to_float(uint16_t(in.b[i / 2] >> (16 * (i % 2))), IsBf16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const auto& in = *static_cast<const MmaFragmentsF32*>(inputs[lane]);
    float* d = static_cast<float*>(outputs[lane]);
    for (int i = 0; i < 4; ++i) {
      const FragmentCoord p = mma_c_coord(lane, i);
      double sum = in.c[i];
      for (int k = 0; k < 16; ++k) sum += a[p.row][k] * b[k][p.col];
      d[i] = float(sum);
    }
  }
}

inline void mma_s8_combine(void*, const void* const* inputs, void* const* outputs) {
  for (int lane = 0; lane < 32; ++lane)
    if (!inputs[lane]) emu::fail("mma.sync needs all 32 lanes; a lane has exited", emu::Site::here());
  int32_t a[16][32], b[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto& in = *static_cast<const MmaFragmentsS32*>(inputs[lane]);
    for (int i = 0; i < 16; ++i) {
      const FragmentCoord p = mma_a_coord_s8(lane, i);
      a[p.row][p.col] = int8_t(uint8_t(in.a[i / 4] >> (8 * (i % 4))));
    }
    for (int i = 0; i < 8; ++i) {
      const FragmentCoord p = mma_b_coord_s8(lane, i);
      b[p.row][p.col] = int8_t(uint8_t(in.b[i / 4] >> (8 * (i % 4))));
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const auto& in = *static_cast<const MmaFragmentsS32*>(inputs[lane]);
    int32_t* d = static_cast<int32_t*>(outputs[lane]);
    for (int i = 0; i < 4; ++i) {
      const FragmentCoord p = mma_c_coord(lane, i);
      uint32_t sum = uint32_t(in.c[i]);
      for (int k = 0; k < 32; ++k) sum += uint32_t(a[p.row][k] * b[k][p.col]);
      d[i] = int32_t(sum);
    }
  }
}
#endif
}  // namespace detail

// D = A B + C for one 16x8x16 tile, T = bf16 or f16 (fp32 accumulation). d may alias c.
template <typename T>
LLMK_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4] LLMK_SITE) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, f16>, "mma_m16n8k16 takes bf16 or f16");
#if defined(LLMK_EMULATED)
  detail::MmaFragmentsF32 in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  float out[4];
  emu::warp_collective("mma.m16n8k16", 0xffffffffu, &in, out, detail::mma_16bit_combine<std::is_same_v<T, bf16>>,
                       nullptr, site);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
#else
  if constexpr (std::is_same_v<T, bf16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
#endif
}

// D = A B + C for one 16x8x32 tile of int8 with int32 accumulation. d may alias c.
LLMK_DEVICE void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const int32_t (&c)[4] LLMK_SITE) {
#if defined(LLMK_EMULATED)
  detail::MmaFragmentsS32 in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  int32_t out[4];
  emu::warp_collective("mma.m16n8k32.s8", 0xffffffffu, &in, out, detail::mma_s8_combine, nullptr, site);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
#endif
}

}  // namespace llmk
