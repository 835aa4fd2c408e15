// The GEMM core's dequantizing B loader for int4 weights (common/quant_format.h): the W4A16 kernel
// (quant_cuda.cu) is the core's main loop with this loader as B, and the LoRA family's int4 base
// path uses it the same way.
//
// Shared tile of one k tile (bk = 32 kb_per_tile), for bn columns:
//   words   [bn / 8][kb_per_tile][32] int32   the packed blocks as they are in global memory, so a
//                                             warp's fragment read is 32 consecutive words (one
//                                             wavefront) and a quarter-warp's cp.async 128
//                                             consecutive bytes
//   scales  [kb_per_tile][bn] T               the scale of each 32-k block's group, per column
//   zeros   [kb_per_tile][bn] uint8           its zero point
//
// Dequantization (per B register, two codes): (word >> 4r) & 0x000f000f OR 0x4300 (bf16 128) or
// 0x6400 (fp16 1024) is the pair 128 + q (1024 + q) in T, exactly; minus the pair 128 + z it is
// q - z, exactly; times the scale it is (q - z) * s rounded once to T: the dequantized fp32 weight
// rounded to T, bit for bit (so the kernel's error is that of a bf16/fp16 matmul with the
// dequantized weight). Three packed 16-bit instructions per two weights.
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/cp_async.h"
#include "common/device.h"
#include "common/float_types.h"
#include "common/quant_format.h"
#include "common/vector_io.h"
#include "gemm/core.cuh"

#if !defined(LLMK_EMULATED)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace llmk::quant {

// 16-bit exponent bits that make code q the float `magic + q` (bf16: 128, fp16: 1024).
template <typename T>
constexpr uint32_t int4_magic() {
  return std::is_same_v<T, bf16> ? 0x4300u : 0x6400u;
}

// Two codes at bits 0-3 and 16-19 of `codes` -> the pair (q - z) * s in T, low half first.
// zero_pair: magic + z in both halves; scale_pair: s in both halves.
template <typename T>
LLMK_DEVICE uint32_t dequantize_int4_pair(uint32_t codes, uint32_t zero_pair, uint32_t scale_pair) {
  const uint32_t biased = (codes & 0x000f000fu) | (int4_magic<T>() * 0x10001u);
#if defined(LLMK_EMULATED)
  auto half = [](uint32_t v, int h) { return uint16_t(v >> (16 * h)); };
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const float d = (to_float(T{half(biased, h)}) - to_float(T{half(zero_pair, h)})) * to_float(T{half(scale_pair, h)});
    out |= uint32_t(from_float<T>(d).bits) << (16 * h);  // d is exact in float: one rounding, as below
  }
  return out;
#else
  uint32_t out;
  if constexpr (std::is_same_v<T, bf16>) {
    const __nv_bfloat162 d = __hmul2(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased),
                                             *reinterpret_cast<const __nv_bfloat162*>(&zero_pair)),
                                     *reinterpret_cast<const __nv_bfloat162*>(&scale_pair));
    out = *reinterpret_cast<const uint32_t*>(&d);
  } else {
    const __half2 d = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&biased),
                                      *reinterpret_cast<const __half2*>(&zero_pair)),
                              *reinterpret_cast<const __half2*>(&scale_pair));
    out = *reinterpret_cast<const uint32_t*>(&d);
  }
  return out;
#endif
}

// The weight-only tilings (W4A16 and W8A16, and LoRA's int4 base): k tiles of 64, whole packed blocks.
using Int4Large = gemm::Tiling<128, 128, 64, 2, 4, 4>;
using Int4Medium = gemm::Tiling<64, 64, 64, 2, 2, 4>;
using Int4Small = gemm::Tiling<16, 64, 64, 1, 4, 6>;

template <typename T, typename Tiling>
struct Int4TileLoader {
  static_assert(Tiling::bk % kInt4BlockK == 0 && Tiling::bn % kInt4BlockN == 0, "whole packed blocks per tile");
  static constexpr int kb_per_tile = Tiling::bk / kInt4BlockK;
  static constexpr int n_blocks = Tiling::bn / kInt4BlockN;
  static constexpr int word_bytes = n_blocks * kb_per_tile * 32 * 4;
  static constexpr int scale_bytes = kb_per_tile * Tiling::bn * 2;
  static constexpr int zero_bytes = kb_per_tile * Tiling::bn;
  static constexpr int bytes = word_bytes + scale_bytes + zero_bytes;
  static_assert(word_bytes % 16 == 0 && scale_bytes % 16 == 0 && zero_bytes % 8 == 0, "aligned regions");

  const int32_t* packed;   // (n / 8, k_blocks, 32)
  const T* scales;         // (groups, n)
  const uint8_t* zeros;    // (groups, n)
  int64_t n, k_blocks, group_size;

  LLMK_DEVICE void load(uint8_t* tile, int64_t col0, int64_t k0, int thread) const {
    const int64_t kb0 = k0 / kInt4BlockK, nb0 = col0 / kInt4BlockN;
    // words: 8 chunks of 16 bytes per (n block, k block)
    constexpr int word_chunks = word_bytes / 16;
#pragma unroll
    for (int c = thread; c < word_chunks; c += Tiling::threads) {
      const int nb = c / (kb_per_tile * 8), kb = (c / 8) % kb_per_tile, part = c % 8;
      const bool inside = (nb0 + nb) * kInt4BlockN < n && kb0 + kb < k_blocks;
      const int32_t* source = inside ? packed + ((nb0 + nb) * k_blocks + kb0 + kb) * 32 + 4 * part : packed;
      cp_async_stream16(tile + 16 * c, source, inside ? 16 : 0);   // read once: L2 evict_first
    }
    // scales and zeros: one 16-byte (8-byte) chunk per (k block, 8 columns), the row of the k block's
    // group. A k block past the end (a tile that overhangs K) gets zeros everywhere: its codes are 0
    // and x is zero there, so it adds nothing.
    constexpr int group_chunks = kb_per_tile * n_blocks;
#pragma unroll
    for (int c = thread; c < group_chunks; c += Tiling::threads) {
      const int kb = c / n_blocks, nb = c % n_blocks;
      const int64_t column = col0 + kInt4BlockN * nb;
      const bool inside = column < n && kb0 + kb < k_blocks;
      const int64_t offset = inside ? (kInt4BlockK * (kb0 + kb) / group_size) * n + column : 0;
      cp_async<16>(tile + word_bytes + 16 * c, scales + offset, inside ? 16 : 0);
      cp_async<8>(tile + word_bytes + scale_bytes + 8 * c, zeros + offset, inside ? 8 : 0);
    }
  }

  // B fragments of mma step kk (k16 step: block kk / 2, its half kk % 2) for the warp's column tiles.
  LLMK_DEVICE void fragments(uint32_t (&b)[Tiling::mma_n][2], const uint8_t* tile, int kk, int warp_col0,
                             int lane) const {
    const int kb = kk / 2, half = kk % 2;
    const auto* words = reinterpret_cast<const uint32_t*>(tile);
    const auto* scale_row = reinterpret_cast<const uint16_t*>(tile + word_bytes) + kb * Tiling::bn;
    const uint8_t* zero_row = tile + word_bytes + scale_bytes + kb * Tiling::bn;
#pragma unroll
    for (int j = 0; j < Tiling::mma_n; ++j) {
      const int nb = warp_col0 / kInt4BlockN + j, column = warp_col0 + kInt4BlockN * j + lane / 4;
      const uint32_t word = load_shared(words + (nb * kb_per_tile + kb) * 32 + lane) >> (8 * half);
      const uint32_t scale_pair = uint32_t(load_shared(scale_row + column)) * 0x10001u;
      const uint32_t zero_pair = (int4_magic<T>() | uint32_t(load_shared(zero_row + column))) * 0x10001u;
      b[j][0] = dequantize_int4_pair<T>(word, zero_pair, scale_pair);
      b[j][1] = dequantize_int4_pair<T>(word >> 4, zero_pair, scale_pair);
    }
  }
};

}  // namespace llmk::quant
