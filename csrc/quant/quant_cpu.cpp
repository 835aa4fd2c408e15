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

// out (M, N) = x · Wᵀ without materializing W: x is permuted once so that each 32-column block's
// values sit in the packed words' nibble order (lane 4g + t of a block holds row g's columns
// 8r + 2t + odd at bits 4r + 16 odd, quant_format.h), x_perm[kb * 32 + 8t + 2r + odd]. Then a word's
// eight codes, as floats minus the group's zero point, multiply eight contiguous x values, lane for
// lane: eight-wide vector products with no horizontal sum until a chunk ends. Per chunk of at most
// 256 columns inside one group (group sizes are multiples of 32, or the whole row): the float sums
// are reduced, times the group's scale, into double totals.
constexpr int kChunkBlocks = 8;   // 256 columns
// The shift of x_perm lane 2r + odd's nibble, as a table, so that the decode can be one vector
// shift (vpsrlvd) rather than a shift computed per lane. (Measured 1.8 to 3.6 ms at M = 1 across
// runs on the shared 2-core machine: the effect is within its noise.)
alignas(32) constexpr uint32_t kLaneShift[8] = {0, 16, 4, 20, 8, 24, 12, 28};

// acc[m][g][lane] += x_perm[m][kb * 32 + 8t + lane] * (code(lane) - z[g]) over one 32-column block,
// for the 8 rows g of a block and every row m of x.
LLMK_CPU_CLONES_QUANT void accumulate_block(const uint32_t* __restrict words, const float* __restrict zeros,
                                            const float* __restrict x_perm, int64_t ldx, int64_t m_count,
                                            float* __restrict acc) {
  for (int g = 0; g < kInt4BlockN; ++g) {
    float codes[4][8];   // row g's 32 codes minus z, in x_perm's order (4 words of 8)
    for (int t = 0; t < 4; ++t) {
      const uint32_t word = words[4 * g + t];
#pragma omp simd
      for (int lane = 0; lane < 8; ++lane)   // lane = 2r + odd: bits 4r + 16 odd (one vector shift)
        codes[t][lane] = float(int32_t((word >> kLaneShift[lane]) & 0xfu)) - zeros[g];
    }
    for (int64_t m = 0; m < m_count; ++m) {   // row g's accumulator stays in a register over the block
      const float* xv = x_perm + m * ldx;
      float* a = acc + (m * kInt4BlockN + g) * 8;
      float sum[8];
#pragma omp simd
      for (int lane = 0; lane < 8; ++lane)
        sum[lane] = a[lane] + xv[lane] * codes[0][lane] + xv[8 + lane] * codes[1][lane] +
                    xv[16 + lane] * codes[2][lane] + xv[24 + lane] * codes[3][lane];
#pragma omp simd
      for (int lane = 0; lane < 8; ++lane) a[lane] = sum[lane];
    }
  }
}

template <typename T, typename S>
void int4_linear_typed(const Int4Problem& p) {
  const int64_t k_blocks = int4_k_blocks(p.k), padded_k = k_blocks * kInt4BlockK;
  const T* x = static_cast<const T*>(p.x);
  const S* scales = static_cast<const S*>(p.scales);
  T* out = static_cast<T*>(p.out);
  // x permuted into nibble order (zeros past K), once: it is read N / 8 times.
  std::vector<float> x_perm(size_t(p.m * padded_k), 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t c = 0; c < p.k; ++c) {
      const int64_t within = c % kInt4BlockK, r = within / 8, t = (within % 8) / 2, odd = within % 2;
      x_perm[m * padded_k + (c - within) + 8 * t + 2 * r + odd] = to_float(x[m * p.ldx + c]);
    }
  const int64_t chunk_blocks = std::min<int64_t>(kChunkBlocks, p.group_size / kInt4BlockK > 0 ? p.group_size / kInt4BlockK : 1);
#pragma omp parallel
  {
    std::vector<float> acc(size_t(p.m * kInt4BlockN * 8));
    std::vector<double> total(size_t(p.m * kInt4BlockN));
#pragma omp for schedule(static)
    for (int64_t block = 0; block < p.n / kInt4BlockN; ++block) {
      const uint32_t* words = reinterpret_cast<const uint32_t*>(p.packed) + block * k_blocks * 32;
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t kb0 = 0; kb0 < k_blocks; kb0 += chunk_blocks) {
        const int64_t group = kb0 * kInt4BlockK / p.group_size;
        float zeros[kInt4BlockN];
        for (int g = 0; g < kInt4BlockN; ++g) zeros[g] = float(p.zeros[group * p.n + block * kInt4BlockN + g]);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t kb = kb0; kb < std::min(k_blocks, kb0 + chunk_blocks); ++kb)
          accumulate_block(words + kb * 32, zeros, x_perm.data() + kb * kInt4BlockK, padded_k, p.m, acc.data());
        for (int64_t m = 0; m < p.m; ++m)
          for (int g = 0; g < kInt4BlockN; ++g) {
            const float* a = acc.data() + (m * kInt4BlockN + g) * 8;
            float sum = 0.0f;
            for (int lane = 0; lane < 8; ++lane) sum += a[lane];
            total[m * kInt4BlockN + g] += double(sum) * to_float(scales[group * p.n + block * kInt4BlockN + g]);
          }
      }
      for (int64_t m = 0; m < p.m; ++m)
        for (int g = 0; g < kInt4BlockN; ++g) {
          const int64_t n = block * kInt4BlockN + g;
          const double value = total[m * kInt4BlockN + g] + (p.bias ? p.bias[n] : 0.0f);
          out[m * p.n + n] = from_float<T>(float(value));
        }
    }
  }
}

// sum_k a[k] b[k] of int8 rows, exactly, in int32 (widened products, vectorized).
LLMK_CPU_CLONES_QUANT int32_t dot_int8(const int8_t* __restrict a, const int8_t* __restrict b, int64_t k) {
  int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < k; ++c) sum += int32_t(a[c]) * int32_t(b[c]);
  return sum;
}

}  // namespace

void int8_linear_cpu(const Int8Problem& p) {
  if (p.m == 0 || p.n == 0) return;
#pragma omp parallel for schedule(static) collapse(2)
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t n = 0; n < p.n; ++n) {
      const int32_t acc = dot_int8(p.a + m * p.k, p.b + n * p.k, p.k);
      const int64_t at = m * p.n + n;
      if (!p.a_scales) {
        static_cast<int32_t*>(p.out)[at] = acc;
        continue;
      }
      float value = float(acc) * p.a_scales[m] * p.b_scales[n];
      if (p.bias) value += p.bias[n];
      switch (p.out_dtype) {
        case DType::bf16: static_cast<bf16*>(p.out)[at] = from_float<bf16>(value); break;
        case DType::f16: static_cast<f16*>(p.out)[at] = from_float<f16>(value); break;
        default: static_cast<float*>(p.out)[at] = value; break;
      }
    }
}

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
