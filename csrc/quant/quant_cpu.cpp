// CPU kernels of the int4 format (quant.h): pack and unpack through quant_format.h's position
// function, OpenMP over blocks of 8 columns (each writes its own words); and W4A16.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/float_types.h"
#include "common/quant_format.h"
#include "core/dispatch.h"
#include "quant/quant.h"

namespace llmk::quant {

// The W4A16 dot products compiled for AVX-512, AVX2 and baseline x86-64, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMK_CPU_CLONES_QUANT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LLMK_CPU_CLONES_QUANT
#endif

void pack_int4_cpu(const uint8_t* codes, int64_t n, int64_t k, int32_t* packed) {
  const int64_t k_blocks = int4_k_blocks(k);
#pragma omp parallel for schedule(static)
  for (int64_t block = 0; block < n / kInt4BlockN; ++block) {
    uint32_t* words = reinterpret_cast<uint32_t*>(packed) + block * k_blocks * 32;
    std::memset(words, 0, size_t(k_blocks) * 32 * sizeof(uint32_t));  // padding past K: code 0
    for (int64_t row = block * kInt4BlockN; row < (block + 1) * kInt4BlockN; ++row)
      for (int64_t col = 0; col < k; ++col) {
        const Int4Position at = int4_position(row, col, k_blocks);
        reinterpret_cast<uint32_t*>(packed)[at.word] |= uint32_t(codes[row * k + col] & 0xf) << at.shift;
      }
  }
}

void unpack_int4_cpu(const int32_t* packed, int64_t n, int64_t k, uint8_t* codes) {
  const int64_t k_blocks = int4_k_blocks(k);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; ++row)
    for (int64_t col = 0; col < k; ++col) {
      const Int4Position at = int4_position(row, col, k_blocks);
      codes[row * k + col] = uint8_t((uint32_t(packed[at.word]) >> at.shift) & 0xf);
    }
}

namespace {

// x (M, K) · W_blockᵀ for one block of 8 output columns, W's 8 rows dequantized into float first.
// A 32-column block's words are decoded by the B-fragment table of quant_format.h: lane 4g + t holds
// row g's columns 8r + 2t and 8r + 2t + 1 at bits 4r and 4r + 16; a block lies inside one group
// (group sizes are multiples of 32, or the whole row), so its scale and zero point are per row.
// Then each row of x is dotted with the 8 rows at once (eight vector accumulators, x read once), in
// float over chunks of 256 (vectorized), the chunks added in double: a K = 14336 row stays far
// inside fp32 matmul's error.
constexpr int64_t kDotChunk = 256;

// out[g] = sum_c x[c] * w[g * ldw + c] for g < 8, c in [c0, c1)
LLMK_CPU_CLONES_QUANT void dot_8_rows(const float* __restrict x, const float* __restrict w, int64_t ldw, int64_t c0,
                                      int64_t c1, float* __restrict out) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
  for (int64_t c = c0; c < c1; ++c) {
    const float v = x[c];
    s0 += v * w[c];
    s1 += v * w[ldw + c];
    s2 += v * w[2 * ldw + c];
    s3 += v * w[3 * ldw + c];
    s4 += v * w[4 * ldw + c];
    s5 += v * w[5 * ldw + c];
    s6 += v * w[6 * ldw + c];
    s7 += v * w[7 * ldw + c];
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
  out[4] = s4; out[5] = s5; out[6] = s6; out[7] = s7;
}

template <typename T, typename S>
void int4_linear_typed(const Int4Problem& p) {
  const int64_t k_blocks = int4_k_blocks(p.k), padded_k = k_blocks * kInt4BlockK;
  const T* x = static_cast<const T*>(p.x);
  const S* scales = static_cast<const S*>(p.scales);
  T* out = static_cast<T*>(p.out);
  std::vector<float> xf;
  if constexpr (!std::is_same_v<T, float>) {   // x in float once (it is read N / 8 times)
    xf.resize(size_t(p.m * p.k));
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < p.m; ++r)
      for (int64_t c = 0; c < p.k; ++c) xf[r * p.k + c] = to_float(x[r * p.ldx + c]);
  }
  const float* xs = std::is_same_v<T, float> ? reinterpret_cast<const float*>(x) : xf.data();
  const int64_t ldx = std::is_same_v<T, float> ? p.ldx : p.k;
#pragma omp parallel
  {
    std::vector<float> w(size_t(kInt4BlockN * padded_k));
#pragma omp for schedule(static)
    for (int64_t block = 0; block < p.n / kInt4BlockN; ++block) {
      const uint32_t* words = reinterpret_cast<const uint32_t*>(p.packed) + block * k_blocks * 32;
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        const int64_t group = kb * kInt4BlockK / p.group_size;
        for (int g = 0; g < kInt4BlockN; ++g) {
          const int64_t n = block * kInt4BlockN + g;
          const float scale = to_float(scales[group * p.n + n]);
          const float zero = float(p.zeros[group * p.n + n]);   // (q - z) s, as the reference computes it
          float* row = w.data() + g * padded_k + kb * kInt4BlockK;
          for (int t = 0; t < 4; ++t) {
            const uint32_t word = words[kb * 32 + 4 * g + t];
            for (int r = 0; r < 4; ++r) {
              row[8 * r + 2 * t] = (float((word >> (4 * r)) & 0xfu) - zero) * scale;
              row[8 * r + 2 * t + 1] = (float((word >> (4 * r + 16)) & 0xfu) - zero) * scale;
            }
          }
        }
      }
      for (int64_t m = 0; m < p.m; ++m) {
        double total[kInt4BlockN] = {};
        for (int64_t c0 = 0; c0 < p.k; c0 += kDotChunk) {
          float partial[kInt4BlockN];
          dot_8_rows(xs + m * ldx, w.data(), padded_k, c0, std::min(p.k, c0 + kDotChunk), partial);
          for (int g = 0; g < kInt4BlockN; ++g) total[g] += partial[g];
        }
        for (int g = 0; g < kInt4BlockN; ++g) {
          const int64_t n = block * kInt4BlockN + g;
          out[m * p.n + n] = from_float<T>(float(p.bias ? total[g] + p.bias[n] : total[g]));
        }
      }
    }
  }
}

}  // namespace

void int4_linear_cpu(const Int4Problem& problem) {
  if (problem.m == 0 || problem.n == 0) return;
  dispatch_floating(problem.x_dtype, "int4_linear (CPU kernel)", [&](auto x_tag) {
    using T = typename decltype(x_tag)::type;
    dispatch<bf16, f16>(problem.scale_dtype, "int4_linear scales", [&](auto s_tag) {
      int4_linear_typed<T, typename decltype(s_tag)::type>(problem);
    });
  });
}

}  // namespace llmk::quant
