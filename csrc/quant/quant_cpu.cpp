// CPU kernels of the int4 format (quant.h): pack and unpack through quant_format.h's position
// function, OpenMP over blocks of 8 columns (each writes its own words); and W4A16.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
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

// Quantization: each row's groups first (scale and zero point, quant_format.h: int4_group), then
// each 8-row block's words from its rows' codes (int4_code), as pack_int4_cpu places them.
void quantize_int4_cpu(const Int4QuantizeProblem& p) {
  dispatch<float, bf16, f16>(p.w_dtype, "quantize_int4 (CPU kernel)", [&](auto w_tag) {
    dispatch<bf16, f16>(p.scale_dtype, "quantize_int4 scales", [&](auto scale_tag) {
      using T = typename decltype(w_tag)::type;
      using S = typename decltype(scale_tag)::type;
      const T* w = static_cast<const T*>(p.w);
      S* scales = static_cast<S*>(p.scales);
      const int64_t groups = p.k / p.group_size, k_blocks = int4_k_blocks(p.k);
#pragma omp parallel for schedule(static)
      for (int64_t block = 0; block < p.n / kInt4BlockN; ++block) {
        uint32_t* words = reinterpret_cast<uint32_t*>(p.packed) + block * k_blocks * 32;
        std::memset(words, 0, size_t(k_blocks) * 32 * sizeof(uint32_t));  // padding past K: code 0
        for (int64_t row = block * kInt4BlockN; row < (block + 1) * kInt4BlockN; ++row)
          for (int64_t g = 0; g < groups; ++g) {
            const T* values = w + row * p.k + g * p.group_size;
            float low = to_float(values[0]), high = low, absmax = std::fabs(low);
            for (int64_t i = 1; i < p.group_size; ++i) {
              const float v = to_float(values[i]);
              low = nan_min(low, v);
              high = nan_max(high, v);
              absmax = nan_max(absmax, std::fabs(v));
            }
            const Int4Group q = int4_group<S>(low, high, absmax, p.symmetric);
            scales[g * p.n + row] = S{q.scale_bits};
            p.zeros[g * p.n + row] = uint8_t(q.zero);
            for (int64_t i = 0; i < p.group_size; ++i) {
              const Int4Position at = int4_position(row, g * p.group_size + i, k_blocks);
              reinterpret_cast<uint32_t*>(p.packed)[at.word] |= int4_code(to_float(values[i]), q.scale, q.zero) << at.shift;
            }
          }
      }
    });
  });
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

// out (M, N) = x · Wᵀ without materializing W, a packed block (8 columns n, 32 of k) at a time, with
// the block's 8 columns n in the 8 lanes of a vector: a multiply-add of a code vector by one x value
// broadcast adds to eight outputs at once, and the group's scales and zero points are vectors too.
//
// Decode. Row g's word t (t = 0..3) sits at 4g + t and holds column 8r + 2t + odd at bits 4r + 16 odd
// (quant_format.h). Eight in-lane unpacks transpose the block's 32 words into 4 vectors by_t[t], lane i
// holding row kLaneRow[i]'s word t (rows 0 2 4 6 1 3 5 7: the unpacks' natural order; scales, zeros
// and outputs follow it). Each of a word's eight nibbles is then masked in place, not shifted down:
//
//   by_t & (0xf << 4r)                 -> q 2^(4r)          (odd = 0)
//   (by_t >> 4) & (0xf << (12 + 4r))   -> q 2^(12 + 4r)     (odd = 1; the highest nibble at bit 24, so
//                                                            the int32 conversion stays positive)
//
// and converted: one mask and one conversion per 8 codes, exact (and one subtraction for fp32 outputs,
// which sum q - 8: accumulate_block). x is permuted once into that column
// order, x_perm[kb * 32 + 8t + r + 4 odd], and scaled by 2^-(4r + 12 odd) to match (exact too, unless
// |x| < 2^-102, where it loses bits to underflow).
//
// Accumulation. A tile of `Rows` rows of x (4, then 2 and 1 for the rest) keeps 8 accumulator vectors
// over a chunk of at most 128 columns inside one group, so one decode feeds Rows rows (8 rows a tile
// measured the same as 4 at M = 16, within 2%). The group's scale and zero point stay out of that
// loop, applied per chunk in double, lanes over the 8 columns n:
//
//   sum_k x[k] (q[k] - z) s = s (sum_k x[k] q[k] - z sum_k x[k]),   sum_k x[k] from x_chunk_sums.
//
// No horizontal sums, and nothing a row of x costs per chunk but 2 x 4 multiply-adds in double.
//
// Measured (one thread of the shared 2-core AVX2 EPYC, N = K = 4096, group 128, bf16 x, the versions
// timed in one process; ms at M = 1 and 16, loaded machine): the first kernel (8 lanes over k, each
// word dequantized in the loop, accumulators through memory) 4.5 and 58; register tiles of 4 x 2
// (rows of x by block rows) over k lanes 2.2 and 20; scale and zero point out of the loop 1.6 and 19;
// two words a 64-bit broadcast, nibbles masked in place, 1.5 and 17 (its horizontal sums at each
// chunk's end: 15% at M = 16, 2x at group 32); this kernel 1.45 and 12.6.
constexpr int kChunkBlocks = 4;   // 128 columns

typedef float Vec8 __attribute__((vector_size(32)));
typedef double Vec4d __attribute__((vector_size(32)));
typedef int32_t Int32x8 __attribute__((vector_size(32)));
typedef uint32_t Uint32x8 __attribute__((vector_size(32)));
typedef uint32_t UnalignedUint32x8 __attribute__((vector_size(32), aligned(4)));   // a plain (vmovdqu) load

// The row g of a packed block in lane i of the decoded vectors.
constexpr int kLaneRow[kInt4BlockN] = {0, 2, 4, 6, 1, 3, 5, 7};

// Where column `within` (0..31) of a block goes in x_perm's block (word t's nibble r + 4 odd), and the
// power of two it is scaled by.
constexpr int x_perm_slot(int within) {
  const int r = within / 8, t = (within % 8) / 2, odd = within % 2;
  return 8 * t + r + 4 * odd;
}
constexpr float x_perm_scale(int within) {
  return 1.0f / float(1u << (4 * (within / 8) + 12 * (within % 2)));
}

// by_t[t] lane i = word t of row kLaneRow[i]: words 0..7 hold rows 0 and 1, 8..15 rows 2 and 3, ...
__attribute__((always_inline)) inline void transpose_block(const uint32_t* words, Uint32x8 (&by_t)[4]) {
  const Uint32x8 rows01 = *reinterpret_cast<const UnalignedUint32x8*>(words);
  const Uint32x8 rows23 = *reinterpret_cast<const UnalignedUint32x8*>(words + 8);
  const Uint32x8 rows45 = *reinterpret_cast<const UnalignedUint32x8*>(words + 16);
  const Uint32x8 rows67 = *reinterpret_cast<const UnalignedUint32x8*>(words + 24);
  // words t = 0, 1 of rows (0 2, 0 2 | 1 3, 1 3), then t = 2, 3 (vpunpckldq, vpunpckhdq)
  const Uint32x8 t01_rows0123 = __builtin_shufflevector(rows01, rows23, 0, 8, 1, 9, 4, 12, 5, 13);
  const Uint32x8 t23_rows0123 = __builtin_shufflevector(rows01, rows23, 2, 10, 3, 11, 6, 14, 7, 15);
  const Uint32x8 t01_rows4567 = __builtin_shufflevector(rows45, rows67, 0, 8, 1, 9, 4, 12, 5, 13);
  const Uint32x8 t23_rows4567 = __builtin_shufflevector(rows45, rows67, 2, 10, 3, 11, 6, 14, 7, 15);
  // rows 0 2 4 6 | 1 3 5 7 of one word t (vpunpcklqdq, vpunpckhqdq)
  by_t[0] = __builtin_shufflevector(t01_rows0123, t01_rows4567, 0, 1, 8, 9, 4, 5, 12, 13);
  by_t[1] = __builtin_shufflevector(t01_rows0123, t01_rows4567, 2, 3, 10, 11, 6, 7, 14, 15);
  by_t[2] = __builtin_shufflevector(t23_rows0123, t23_rows4567, 0, 1, 8, 9, 4, 5, 12, 13);
  by_t[3] = __builtin_shufflevector(t23_rows0123, t23_rows4567, 2, 3, 10, 11, 6, 7, 14, 15);
}

// sums[r] (lanes: the block's 8 columns n) = sum over `blocks` blocks from `words` on of x[r] q (or
// x[r] (q - 8) when Centered), for the Rows rows of x_perm (stride ldx) at the same blocks.
template <int Rows, bool Centered>
__attribute__((always_inline, optimize("fp-contract=fast"))) inline void accumulate_rows(
    const uint32_t* __restrict words, const float* __restrict x_perm, int64_t ldx, int64_t blocks,
    Vec8 (&sums)[Rows]) {
  // Accumulators a row, taking the columns in turn: eight in all, enough independent chains to hide
  // the multiply-add latency; four at one row (eight spilled two of them: 7% slower).
  constexpr int Chains = Rows == 1 ? 4 : kInt4BlockN / Rows;
  Vec8 acc[Rows][Chains] = {};
  for (int64_t kb = 0; kb < blocks; ++kb) {
    Uint32x8 by_t[4];
    transpose_block(words + kb * 32, by_t);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      const Uint32x8 high = by_t[t] >> 4;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {   // nibble r = j % 4 of half odd = j / 4
        const int shift = j < 4 ? 4 * j : 12 + 4 * (j - 4);
        const Uint32x8 lanes = (j < 4 ? by_t[t] : high) & (0xfu << shift);
        const Int32x8 values = __builtin_convertvector(lanes, Int32x8) - (Centered ? 8 << shift : 0);
        const Vec8 codes = __builtin_convertvector(values, Vec8);
        const float* x = x_perm + kb * kInt4BlockK + 8 * t + j;
#pragma GCC unroll 8
        for (int r = 0; r < Rows; ++r) acc[r][(8 * t + j) % Chains] += x[r * ldx] * codes;
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    sums[r] = acc[r][0];
#pragma GCC unroll 8
    for (int a = 1; a < Chains; ++a) sums[r] += acc[r][a];
  }
}

// A group's scales and zero points (minus center) of a block's 8 columns, from `at` (group * N) on, in
// lane order, as doubles. Read here, one group a chunk, rather than all groups before the block: those
// reads are 2 x groups cache lines (a line of the (groups, N) arrays a group, shared by 4 or 8 blocks),
// and up front their misses stalled the block (15 to 35% of the time at M = 1); between chunks the
// work hides them.
__attribute__((always_inline)) inline void load_group(const void* scales, bool scales_bf16, const uint8_t* zeros,
                                                    double center, int64_t at, Vec4d (&s)[2], Vec4d (&z)[2]) {
  for (int i = 0; i < kInt4BlockN; ++i) {
    const int64_t column = at + kLaneRow[i];
    s[i / 4][i % 4] = scales_bf16 ? to_float(static_cast<const bf16*>(scales)[column])
                                  : to_float(static_cast<const f16*>(scales)[column]);
    z[i / 4][i % 4] = zeros[column] - center;
  }
}

// totals (8 doubles, lane order) += s (sum - z x_sum), lane for lane.
__attribute__((always_inline)) inline void add_chunk(const Vec8& sum, const Vec4d (&scales)[2], const Vec4d (&zeros)[2],
                                                   double x_sum, double* totals) {
  const Vec4d halves[2] = {__builtin_convertvector(__builtin_shufflevector(sum, sum, 0, 1, 2, 3), Vec4d),
                           __builtin_convertvector(__builtin_shufflevector(sum, sum, 4, 5, 6, 7), Vec4d)};
  for (int h = 0; h < 2; ++h) {
    Vec4d total;
    std::memcpy(&total, totals + 4 * h, sizeof(total));
    total += scales[h] * (halves[h] - zeros[h] * x_sum);
    std::memcpy(totals + 4 * h, &total, sizeof(total));
  }
}

template <int Rows, bool Centered>
__attribute__((always_inline, optimize("fp-contract=fast"))) inline void accumulate_tile(
    const uint32_t* words, const float* x_perm, int64_t ldx, int64_t blocks, const Vec4d (&scales)[2],
    const Vec4d (&zeros)[2], const double* x_chunk_sums, int64_t chunks, double* totals) {
  Vec8 sums[Rows];
  accumulate_rows<Rows, Centered>(words, x_perm, ldx, blocks, sums);
  for (int r = 0; r < Rows; ++r)
    add_chunk(sums[r], scales, zeros, x_chunk_sums[r * chunks], totals + r * kInt4BlockN);
}

// One chunk (blocks from kb0 on) for every row of x: tiles of 4 rows, then 2 and 1.
template <bool Centered>
__attribute__((always_inline, optimize("fp-contract=fast"))) inline void accumulate_chunk(
    const uint32_t* words, const float* x_perm, int64_t ldx, int64_t m_count, int64_t kb0, int64_t blocks,
    const Vec4d (&s)[2], const Vec4d (&z)[2], const double* x_chunk_sums, int64_t chunk, int64_t chunks,
    double* totals) {
  const uint32_t* w = words + kb0 * 32;
  const float* x = x_perm + kb0 * kInt4BlockK;
  const double* x_sums = x_chunk_sums + chunk;
  int64_t m = 0;
  for (; m + 4 <= m_count; m += 4)
    accumulate_tile<4, Centered>(w, x + m * ldx, ldx, blocks, s, z, x_sums + m * chunks, chunks, totals + m * 8);
  if (m + 2 <= m_count) {
    accumulate_tile<2, Centered>(w, x + m * ldx, ldx, blocks, s, z, x_sums + m * chunks, chunks, totals + m * 8);
    m += 2;
  }
  if (m < m_count)
    accumulate_tile<1, Centered>(w, x + m * ldx, ldx, blocks, s, z, x_sums + m * chunks, chunks, totals + m * 8);
}

// One packed block of 8 columns n over all of K, for every row of x: totals[m * 8 + i] = x[m] · w[row
// kLaneRow[i]]. scales (bf16 or fp16) and zeros: the (groups, n) arrays from this block's first column
// on; chunks of chunk_blocks blocks, never across a group's end (chunk_blocks divides group_blocks, or
// there is one group).
//
// centered: the codes enter the sums as q - 8 (one more integer subtraction per 8 codes: 20% slower at
// M = 1, 11% at M = 16), z - 8 taking z's place. For fp32 outputs: summed uncentered, every product is
// q / |q - z| ~ 3 times larger, and so is the float rounding of the sums: 0.8 to 1.3x the parity bound
// (twice PyTorch's fp32 error) at K = 256 per channel, against 0.2 to 0.4x centered. bf16 and fp16
// outputs round far above either.
LLMK_CPU_CLONES_QUANT __attribute__((optimize("fp-contract=fast"))) void accumulate_block(
    const uint32_t* __restrict words, const float* __restrict x_perm, const double* __restrict x_chunk_sums,
    int64_t m_count, int64_t k_blocks, int64_t group_blocks, int64_t chunk_blocks, const void* scales,
    bool scales_bf16, const uint8_t* zeros, int64_t n, bool centered, double* __restrict totals) {
  const int64_t ldx = k_blocks * kInt4BlockK, chunks = (k_blocks + chunk_blocks - 1) / chunk_blocks;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t kb0 = chunk * chunk_blocks, blocks = std::min(chunk_blocks, k_blocks - kb0);
    Vec4d s[2], z[2];
    load_group(scales, scales_bf16, zeros, centered ? 8.0 : 0.0, kb0 / group_blocks * n, s, z);
    if (centered)
      accumulate_chunk<true>(words, x_perm, ldx, m_count, kb0, blocks, s, z, x_chunk_sums, chunk, chunks, totals);
    else
      accumulate_chunk<false>(words, x_perm, ldx, m_count, kb0, blocks, s, z, x_chunk_sums, chunk, chunks, totals);
  }
}

template <typename T, typename S>
void int4_linear_typed(const Int4Problem& p) {
  const int64_t k_blocks = int4_k_blocks(p.k), padded_k = k_blocks * kInt4BlockK;
  const T* x = static_cast<const T*>(p.x);
  const S* scales = static_cast<const S*>(p.scales);
  T* out = static_cast<T*>(p.out);
  // Groups are whole blocks (group_size 32, 64, 128), or one group per row (K, maybe not a multiple of 32).
  const int64_t group_blocks = p.group_size % kInt4BlockK == 0 ? p.group_size / kInt4BlockK : k_blocks;
  const int64_t groups = (k_blocks + group_blocks - 1) / group_blocks;
  const int64_t chunk_blocks = groups == 1 ? kChunkBlocks : std::gcd(group_blocks, int64_t(kChunkBlocks));
  const int64_t chunks = (k_blocks + chunk_blocks - 1) / chunk_blocks;
  // x permuted and scaled (zeros past K), and each chunk's sum, once: read N / 8 times. (One thread
  // below 64 rows: a few microseconds of work there, less than a parallel region's start and barrier.)
  std::vector<float> x_perm(size_t(p.m * padded_k), 0.0f);
  std::vector<double> x_chunk_sums(size_t(p.m * chunks), 0.0);
#pragma omp parallel for schedule(static) if (p.m >= 64)
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      double block_sum = 0.0;
      for (int within = 0; within < kInt4BlockK && kb * kInt4BlockK + within < p.k; ++within) {
        const float value = to_float(x[m * p.ldx + kb * kInt4BlockK + within]);
        x_perm[m * padded_k + kb * kInt4BlockK + x_perm_slot(within)] = value * x_perm_scale(within);
        block_sum += value;
      }
      x_chunk_sums[m * chunks + kb / chunk_blocks] += block_sum;
    }
#pragma omp parallel
  {
    std::vector<double> totals(size_t(p.m * kInt4BlockN));
#pragma omp for schedule(static) nowait
    for (int64_t block = 0; block < p.n / kInt4BlockN; ++block) {
      std::fill(totals.begin(), totals.end(), 0.0);
      accumulate_block(reinterpret_cast<const uint32_t*>(p.packed) + block * k_blocks * 32, x_perm.data(),
                       x_chunk_sums.data(), p.m, k_blocks, group_blocks, chunk_blocks, scales + block * kInt4BlockN,
                       std::is_same<S, bf16>::value, p.zeros + block * kInt4BlockN, p.n, std::is_same<T, float>::value,
                       totals.data());
      for (int64_t m = 0; m < p.m; ++m)
        for (int i = 0; i < kInt4BlockN; ++i) {
          const int64_t n = block * kInt4BlockN + kLaneRow[i];
          const double value = totals[m * kInt4BlockN + i] + (p.bias ? p.bias[n] : 0.0f);
          if (p.out_f32) static_cast<float*>(p.out)[m * p.n + n] = float(value);
          else out[m * p.n + n] = from_float<T>(float(value));
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
