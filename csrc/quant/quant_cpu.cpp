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

// x (M, K) · W_blockᵀ for one block of 8 output columns, W's 8 rows dequantized into float first:
// each packed word is read once and decoded by the B-fragment table of quant_format.h. Dot products
// in float over chunks of 256 (vectorized), the chunks added in double: a K = 14336 row stays far
// inside fp32 matmul's error.
constexpr int64_t kDotChunk = 256;

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
      for (int64_t kb = 0; kb < k_blocks; ++kb)
        for (int lane = 0; lane < 32; ++lane) {
          const uint32_t word = words[kb * 32 + lane];
          const int g = lane / 4, t = lane % 4;
          const int64_t n = block * kInt4BlockN + g;
          for (int r = 0; r < 4; ++r) {
            const int64_t k = kb * kInt4BlockK + 16 * (r / 2) + 8 * (r % 2) + 2 * t;   // the pair's lower k
            for (int odd = 0; odd < 2; ++odd) {
              const int64_t kk = k + odd;
              float value = 0.0f;
              if (kk < p.k) {
                const int64_t group = kk / p.group_size;
                const float code = float((word >> (4 * r + 16 * odd)) & 0xfu);
                value = (code - float(p.zeros[group * p.n + n])) * to_float(scales[group * p.n + n]);
              }
              w[g * padded_k + kk] = value;
            }
          }
        }
      for (int64_t row = 0; row < p.m; ++row) {
        const float* xr = xs + row * ldx;
        for (int g = 0; g < kInt4BlockN; ++g) {
          const float* wr = w.data() + g * padded_k;
          double total = 0.0;
          for (int64_t c0 = 0; c0 < p.k; c0 += kDotChunk) {
            const int64_t c1 = std::min(p.k, c0 + kDotChunk);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t c = c0; c < c1; ++c) sum += xr[c] * wr[c];
            total += sum;
          }
          const int64_t n = block * kInt4BlockN + g;
          if (p.bias) total += p.bias[n];
          out[row * p.n + n] = from_float<T>(float(total));
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
