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

// out (M, N) = x · Wᵀ without materializing W. x is permuted once so that each 32-column block's
// values sit in the packed words' nibble order (lane 4g + t of a block holds row g's columns
// 8r + 2t + odd at bits 4r + 16 odd, quant_format.h), x_perm[kb * 32 + 8t + 2r + odd]. Then a word's
// eight codes, as floats, multiply eight contiguous x values lane for lane: eight-wide vector
// products with no horizontal sum until a chunk of at most 256 columns inside one group ends. The
// group's scale and zero point stay out of that loop, applied per chunk in double:
//
//   sum_k x[k] (q[k] - z) s = s (sum_k x[k] q[k] - z sum_k x[k]),   sum_k x[k] from x_block_sums.
//
// (Dequantizing each word in the loop, one multiply-add by s with offset -z s, cost 0.3 ns a word:
// 2.3 against 1.5 ms at M = 1, N = K = 4096, one thread.)
//
// Register blocking: a tile of `Rows` rows of x by 8 / Rows rows g of a packed block keeps its eight
// accumulator vectors in registers over a chunk, so one decoded word feeds Rows rows of x and one
// load of x feeds 8 / Rows words: 4 x 2 while M >= 4, then 2 x 4 and 1 x 8 (at M = 1 the eight
// words of a step give eight independent chains, enough to hide the multiply-add latency). Chunks
// are the outer loop of a block so that x's chunk (16 rows: 16 KiB) stays in L1 over its tiles.
constexpr int kChunkBlocks = 8;   // 256 columns

typedef float Vec8 __attribute__((vector_size(32)));
typedef float UnalignedVec8 __attribute__((vector_size(32), aligned(4)));  // a plain (vmovups) load
typedef int32_t Int32x8 __attribute__((vector_size(32)));
typedef uint32_t Uint32x8 __attribute__((vector_size(32)));

// The shift of x_perm lane 2r + odd's nibble, so that the decode is one vector shift (vpsrlvd) of
// the word broadcast to all lanes.
constexpr Uint32x8 kLaneShift = {0, 16, 4, 20, 8, 24, 12, 28};

// Where column `within` (0..31) of a block goes in x_perm's block: lane 2r + odd of word t.
constexpr int x_perm_slot(int within) {
  return 8 * ((within % 8) / 2) + 2 * (within / 8) + within % 2;
}

// A word's eight codes as floats in x_perm's lane order: broadcast, shift, mask, convert.
__attribute__((always_inline)) inline void decode_word(uint32_t word, Vec8& codes) {
  const Uint32x8 lanes = (Uint32x8{word, word, word, word, word, word, word, word} >> kLaneShift) & 0xfu;
  codes = __builtin_convertvector(__builtin_convertvector(lanes, Int32x8), Vec8);
}

// The lane sums of eight vectors, as one vector: sums[i] = v[i][0] + ... + v[i][7] (pairwise, in the
// vhaddps pattern: 9 shuffles and adds rather than eight separate horizontal sums).
__attribute__((always_inline)) inline void sum_lanes(const Vec8 (&v)[8], Vec8& sums) {
  auto pair_sums = [](Vec8 a, Vec8 b) {   // [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  // quads: the sums of lanes 0..3 of v[4j], ..., v[4j + 3], then of their lanes 4..7
  const Vec8 quads0 = pair_sums(pair_sums(v[0], v[1]), pair_sums(v[2], v[3]));
  const Vec8 quads1 = pair_sums(pair_sums(v[4], v[5]), pair_sums(v[6], v[7]));
  sums = __builtin_shufflevector(quads0, quads1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(quads0, quads1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// One chunk of `blocks` 32-column blocks (inside one group) for the Rows rows of x at x_perm (stride
// ldx) and all 8 rows g of a packed block: totals[r * 8 + g] += s[g] (x[r] · q[g] - z[g] sum x[r]).
// words, x_perm and x_block_sums point at the chunk's first block.
template <int Rows>
__attribute__((always_inline, optimize("fp-contract=fast"))) inline void accumulate_chunk(
    const uint32_t* __restrict words, const float* __restrict x_perm, const double* __restrict x_block_sums,
    int64_t ldx, int64_t k_blocks, int64_t blocks, const float* __restrict scales, const float* __restrict zeros,
    double* __restrict totals) {
  constexpr int Cols = kInt4BlockN / Rows;   // block rows g per tile
  double x_sums[Rows];
  for (int r = 0; r < Rows; ++r) {
    x_sums[r] = 0.0;
    for (int64_t kb = 0; kb < blocks; ++kb) x_sums[r] += x_block_sums[r * k_blocks + kb];
  }
  for (int g0 = 0; g0 < kInt4BlockN; g0 += Cols) {
    Vec8 acc[kInt4BlockN] = {};   // acc[r * Cols + c]: row r of x times block row g0 + c
    for (int64_t kb = 0; kb < blocks; ++kb)
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        // x first, then each word decoded and used at once: Rows + 1 + 8 live vectors, no spills
        // (decoding all eight words first spilled accumulators at Rows = 1).
        Vec8 xv[Rows];
#pragma GCC unroll 4
        for (int r = 0; r < Rows; ++r)
          xv[r] = *reinterpret_cast<const UnalignedVec8*>(x_perm + r * ldx + kb * kInt4BlockK + 8 * t);
#pragma GCC unroll 8
        for (int c = 0; c < Cols; ++c) {
          Vec8 codes;
          decode_word(words[kb * 32 + 4 * (g0 + c) + t], codes);
#pragma GCC unroll 4
          for (int r = 0; r < Rows; ++r) acc[r * Cols + c] += xv[r] * codes;
        }
      }
    Vec8 sums;
    sum_lanes(acc, sums);
#pragma GCC unroll 8
    for (int i = 0; i < kInt4BlockN; ++i) {
      const int r = i / Cols, g = g0 + i % Cols;
      totals[r * kInt4BlockN + g] += double(scales[g]) * (double(sums[i]) - double(zeros[g]) * x_sums[r]);
    }
  }
}

// One packed block of 8 columns n over all of K, for every row of x: totals[m * 8 + g] = x[m] · w[g].
// scales and zeros: (groups, 8) floats of this block; a group is group_blocks blocks.
LLMK_CPU_CLONES_QUANT __attribute__((optimize("fp-contract=fast"))) void accumulate_block(
    const uint32_t* __restrict words, const float* __restrict x_perm, const double* __restrict x_block_sums,
    int64_t m_count, int64_t k_blocks, int64_t group_blocks, const float* __restrict scales,
    const float* __restrict zeros, double* __restrict totals) {
  const int64_t ldx = k_blocks * kInt4BlockK;
  for (int64_t kb0 = 0; kb0 < k_blocks;) {
    const int64_t group = kb0 / group_blocks;
    const int64_t blocks = std::min({int64_t(kChunkBlocks), k_blocks - kb0, (group + 1) * group_blocks - kb0});
    const uint32_t* w = words + kb0 * 32;
    const float *s = scales + group * kInt4BlockN, *z = zeros + group * kInt4BlockN;
    int64_t m = 0;
    for (; m + 4 <= m_count; m += 4)
      accumulate_chunk<4>(w, x_perm + m * ldx + kb0 * kInt4BlockK, x_block_sums + m * k_blocks + kb0, ldx, k_blocks,
                          blocks, s, z, totals + m * kInt4BlockN);
    if (m + 2 <= m_count) {
      accumulate_chunk<2>(w, x_perm + m * ldx + kb0 * kInt4BlockK, x_block_sums + m * k_blocks + kb0, ldx, k_blocks,
                          blocks, s, z, totals + m * kInt4BlockN);
      m += 2;
    }
    if (m < m_count)
      accumulate_chunk<1>(w, x_perm + m * ldx + kb0 * kInt4BlockK, x_block_sums + m * k_blocks + kb0, ldx, k_blocks,
                          blocks, s, z, totals + m * kInt4BlockN);
    kb0 += blocks;
  }
}

template <typename T, typename S>
void int4_linear_typed(const Int4Problem& p) {
  const int64_t k_blocks = int4_k_blocks(p.k), padded_k = k_blocks * kInt4BlockK;
  const T* x = static_cast<const T*>(p.x);
  const S* scales = static_cast<const S*>(p.scales);
  T* out = static_cast<T*>(p.out);
  // x permuted into nibble order (zeros past K) and each block's sum, once: read N / 8 times.
  std::vector<float> x_perm(size_t(p.m * padded_k), 0.0f);
  std::vector<double> x_block_sums(size_t(p.m * k_blocks), 0.0);
#pragma omp parallel for schedule(static) if (p.m >= 64)
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t c = 0; c < p.k; ++c) {
      const float value = to_float(x[m * p.ldx + c]);
      x_perm[m * padded_k + c / kInt4BlockK * kInt4BlockK + x_perm_slot(int(c % kInt4BlockK))] = value;
      x_block_sums[m * k_blocks + c / kInt4BlockK] += value;
    }
  // Groups are whole blocks (group_size 32, 64, 128), or one group per row (K, maybe not a multiple of 32).
  const int64_t group_blocks = p.group_size % kInt4BlockK == 0 ? p.group_size / kInt4BlockK : k_blocks;
  const int64_t groups = (k_blocks + group_blocks - 1) / group_blocks;
#pragma omp parallel
  {
    std::vector<float> block_scales(size_t(groups * kInt4BlockN)), block_zeros(block_scales.size());
    std::vector<double> totals(size_t(p.m * kInt4BlockN));
#pragma omp for schedule(static)
    for (int64_t block = 0; block < p.n / kInt4BlockN; ++block) {
      for (int64_t group = 0; group < groups; ++group)
        for (int g = 0; g < kInt4BlockN; ++g) {
          const int64_t at = group * p.n + block * kInt4BlockN + g;
          block_scales[group * kInt4BlockN + g] = to_float(scales[at]);
          block_zeros[group * kInt4BlockN + g] = float(p.zeros[at]);
        }
      std::fill(totals.begin(), totals.end(), 0.0);
      accumulate_block(reinterpret_cast<const uint32_t*>(p.packed) + block * k_blocks * 32, x_perm.data(),
                       x_block_sums.data(), p.m, k_blocks, group_blocks, block_scales.data(), block_zeros.data(),
                       totals.data());
      for (int64_t m = 0; m < p.m; ++m)
        for (int g = 0; g < kInt4BlockN; ++g) {
          const int64_t n = block * kInt4BlockN + g;
          const double value = totals[m * kInt4BlockN + g] + (p.bias ? p.bias[n] : 0.0f);
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
