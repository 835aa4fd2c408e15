// CPU forward of attention (attention.h): the blocked online softmax the CUDA kernel will use, in
// fp32, never materializing the seqlen_q x seqlen_k scores.
//
// OpenMP over (sequence, query head, block of kBlockQ queries). For each block, the keys its queries
// may see are one range [range(first).begin, range(last).end) (allowed_keys is monotone); they are
// walked in blocks of kBlockK: S = Q Kᵀ * scale, softcap, ALiBi, the per-element mask only where a key
// block straddles a query's range, then the running max m, sum l and output O are rescaled:
//   m' = max(m, max_j S_ij),  l' = l e^(m - m') + sum_j e^(S_ij - m'),  O' = O e^(m - m') + sum_j e^(S_ij - m') V_j
// and at the end out = O / l, lse = m + log l (out = 0, lse = +inf for a query with no key).
//
// The backward (FlashAttention-2's, attention.h) recomputes P = exp(score - lse) in two passes with no
// atomics and no reduction across threads: dk and dv per (sequence, kv head, key block) over every
// query head of its group and the queries that see the block, then dq per (sequence, query head,
// query block). Deterministic. Its dot products, scores, P and gradient sums are in double: in fp32,
// exp(score - lse) turns the score's rounding into a relative error of |score| ulps, and dq, dk, dv
// came out at 2-3x the error of PyTorch's materialized fp32 computation (the tests' parity rule).
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "common/float_types.h"
#include "core/dispatch.h"

namespace llmk::attention {
namespace {

constexpr int64_t kBlockQ = 32;
constexpr int64_t kBlockK = 64;

template <typename T>
void load_rows(const T* base, int64_t row_stride, int64_t rows, int64_t dim, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = base + r * row_stride;
    float* d = dst + r * dim;
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) d[c] = to_float(src[c]);
  }
}

// The two inner loops of the forward, compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time (as the GEMM's CPU kernel): built for baseline x86-64 alone they ran 4-wide SSE.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LLMK_CPU_CLONES
#endif

// exp(x) for x <= 0 (a score minus its row's running max), in plain arithmetic that vectorizes (no
// libm call, no branch): 2^n e^r with n = round(x log2 e), r = x - n ln 2 (in two parts), e^r by
// Cephes' degree-6 polynomial (about 1 ulp). -inf and anything below -87 give exactly 0. Scalar
// std::exp took half of the forward's time (a 20 ns call per score).
inline float exp_nonpositive(float x) {
  const bool underflow = !(x >= -87.0f);  // also -inf and NaN
  x = underflow ? 0.0f : x;
  const float shifter = 12582912.0f;     // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflow ? 0.0f : p * scale;
}

// The forward's two products on a query block, register-blocked (4 rows x 16 columns of c in vector
// registers; the old kernel's dots reduced one key at a time, horizontally):
//   c[rows x cols] += a[rows x inner] b[inner x cols], all row-major, rows a multiple of 4, cols a
//   multiple of 8. S = Q Kᵀ takes b = Kᵀ (the key tile transposed as it is loaded), O += P V takes b = V.
// A multiply and an add a step (the build forbids contraction), and sums over at most kSumChunk
// products added to c one chunk at a time: one chain of 256 steps (head_dim 256) made the fp32
// output 3.4x PyTorch's error (2.3x with fused multiply-adds). Compiled for AVX-512, AVX2 and baseline
// x86-64, picked at load time. Measured (2-core AVX2 EPYC, fp32, causal, batch 2, 8 heads): 22 and
// 38 GFLOP/s, 0.54x and 0.55x CPU SDPA at (seqlen 512, head_dim 64) and (1024, 128), from 0.31x
// and 0.24x with per-key dot products and a scalar exp.
constexpr int64_t kSumChunk = 32;
typedef float Vec8 __attribute__((vector_size(32)));
typedef float UnalignedVec8 __attribute__((vector_size(32), aligned(4)));  // a plain (vmovups) load or store

// (always_inline: compiled on its own, it was built once for baseline x86-64 and the AVX2 clone of
// its caller ran SSE code at 2.6 GFLOP/s.)
template <int Width>
__attribute__((always_inline)) inline void multiply_block(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
                           float* __restrict c, int64_t ldc, int64_t inner) {
  constexpr int V = Width / 8;
  Vec8 acc[4][V] = {};
  for (int64_t k = 0; k < inner; ++k) {
    // (loaded as vectors: a memcpy into a Vec8 array went through the stack, four 16-byte stores and
    // a 32-byte load that could not be forwarded, the kernel's hottest instruction)
    Vec8 bk[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) bk[v] = *reinterpret_cast<const UnalignedVec8*>(b + k * ldb + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const float a_rk = a[r * lda + k];
      const Vec8 x = {a_rk, a_rk, a_rk, a_rk, a_rk, a_rk, a_rk, a_rk};
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][v] += x * bk[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      UnalignedVec8* out = reinterpret_cast<UnalignedVec8*>(c + r * ldc + 8 * v);
      *out = *out + acc[r][v];
    }
}

LLMK_CPU_CLONES void multiply_accumulate(const float* __restrict a, int64_t lda, const float* __restrict b,
                                         int64_t ldb, float* __restrict c, int64_t ldc, int64_t rows, int64_t inner,
                                         int64_t cols) {
  for (int64_t k = 0; k < inner; k += kSumChunk) {
    const int64_t chunk = std::min(kSumChunk, inner - k);
    for (int64_t r = 0; r < rows; r += 4) {
      int64_t n = 0;
      for (; n + 16 <= cols; n += 16)
        multiply_block<16>(a + r * lda + k, lda, b + k * ldb + n, ldb, c + r * ldc + n, ldc, chunk);
      for (; n < cols; n += 8)
        multiply_block<8>(a + r * lda + k, lda, b + k * ldb + n, ldb, c + r * ldc + n, ldc, chunk);
    }
  }
}

// One row of scores (cols keys) to probabilities: max, exp(s - max), sum. Returns the row's max.
LLMK_CPU_CLONES float exponentiate_row(float* __restrict s, int64_t cols, float row_max, float* sum) {
  float block_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : block_max)
  for (int64_t c = 0; c < cols; ++c) block_max = std::max(block_max, s[c]);
  const float new_max = std::max(row_max, block_max);
  const float base = new_max == -std::numeric_limits<float>::infinity() ? 0.0f : new_max;
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < cols; ++c) {
    s[c] = exp_nonpositive(s[c] - base);
    total += s[c];
  }
  *sum = total;
  return new_max;
}

// Rows [0, rows) of a (token, head_dim) slice into a float tile of `pad_rows` rows, zeros past `rows`;
// transposed: column r of a (dim x pad_rows) tile.
template <typename T>
void load_tile(const T* base, int64_t row_stride, int64_t rows, int64_t pad_rows, int64_t dim, float* dst,
               bool transposed) {
  for (int64_t r = 0; r < pad_rows; ++r) {
    const T* src = base + r * row_stride;
    if (transposed) {
      for (int64_t c = 0; c < dim; ++c) dst[c * pad_rows + r] = r < rows ? to_float(src[c]) : 0.0f;
    } else {
      float* d = dst + r * dim;
      if (r < rows) {
#pragma omp simd
        for (int64_t c = 0; c < dim; ++c) d[c] = to_float(src[c]);
      } else {
        std::fill(d, d + dim, 0.0f);
      }
    }
  }
}

template <typename T>
void forward_typed(const Problem& p) {
  const int64_t d = p.head_dim, group = p.heads_q / p.heads_k;
  const int64_t max_q = p.cu_seqlens_q ? 0 : p.seqlen_q;
  // Work items: (sequence, head, query block). Varlen sequences differ in length: count blocks per
  // sequence from the longest (empty items return at once).
  int64_t longest = max_q;
  if (p.cu_seqlens_q)
    for (int64_t b = 0; b < p.batch; ++b) longest = std::max(longest, p.q_length(b));
  const int64_t q_blocks = (longest + kBlockQ - 1) / kBlockQ;
  const int64_t items = p.batch * p.heads_q * q_blocks;
  const float inf = std::numeric_limits<float>::infinity();
  const bool plain = p.softcap <= 0.0f && !p.alibi_slopes;

#pragma omp parallel
  {
    std::vector<float> q_tile(kBlockQ * d), k_transposed(d * kBlockK), v_tile(kBlockK * d),
        scores(kBlockQ * kBlockK);
    std::vector<float> o(kBlockQ * d), m(kBlockQ), l(kBlockQ);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / (p.heads_q * q_blocks);
      const int64_t h = (item / q_blocks) % p.heads_q;
      const int64_t i0 = (item % q_blocks) * kBlockQ;
      const int64_t sq = p.q_length(b), sk = p.k_length(b);
      if (i0 >= sq) continue;
      const int64_t rows = std::min(kBlockQ, sq - i0);
      const int64_t hk = h / group;
      const T* q = static_cast<const T*>(p.q) + b * p.q_layout.batch + (p.q_begin(b) + i0) * p.q_layout.token +
                   h * p.q_layout.head;
      const T* k = static_cast<const T*>(p.k) + b * p.k_layout.batch + p.k_begin(b) * p.k_layout.token + hk * p.k_layout.head;
      const T* v = static_cast<const T*>(p.v) + b * p.v_layout.batch + p.k_begin(b) * p.v_layout.token + hk * p.v_layout.head;
      const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;

      load_tile(q, p.q_layout.token, rows, kBlockQ, d, q_tile.data(), false);
      std::fill(o.begin(), o.end(), 0.0f);
      std::fill(m.begin(), m.end(), -inf);
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t key_begin = allowed_keys(i0, sq, sk, p.mask).begin;
      const int64_t key_end = allowed_keys(i0 + rows - 1, sq, sk, p.mask).end;
      // keys every row of the block may see: blocks inside need no per-element mask
      const int64_t full_begin = allowed_keys(i0 + rows - 1, sq, sk, p.mask).begin;
      const int64_t full_end = allowed_keys(i0, sq, sk, p.mask).end;
      for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, key_end - j0);
        load_tile(k + j0 * p.k_layout.token, p.k_layout.token, cols, kBlockK, d, k_transposed.data(), true);
        load_tile(v + j0 * p.v_layout.token, p.v_layout.token, cols, kBlockK, d, v_tile.data(), false);
        std::fill(scores.begin(), scores.end(), 0.0f);
        multiply_accumulate(q_tile.data(), d, k_transposed.data(), kBlockK, scores.data(), kBlockK, kBlockQ, d, kBlockK);
        const bool masked = j0 < full_begin || j0 + kBlockK > full_end;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          float* s = scores.data() + r * kBlockK;
          if (plain && !masked) {
#pragma omp simd
            for (int64_t c = 0; c < kBlockK; ++c) s[c] *= p.scale;
          } else {
            const KeyRange range = allowed_keys(i, sq, sk, p.mask);
            for (int64_t c = 0; c < kBlockK; ++c) {
              const int64_t j = j0 + c;
              if (j < range.begin || j >= range.end) {
                s[c] = -inf;
                continue;
              }
              float score = s[c] * p.scale;
              if (p.softcap > 0.0f) score = p.softcap * std::tanh(score / p.softcap);
              if (p.alibi_slopes) score -= slope * float(std::llabs(i + sk - sq - j));
              s[c] = score;
            }
          }
          float sum;
          const float new_max = exponentiate_row(s, kBlockK, m[r], &sum);
          const float rescale = new_max == -inf ? 1.0f : exp_nonpositive(m[r] - new_max);  // 0 when m was -inf
          l[r] = l[r] * rescale + sum;
          m[r] = new_max;
          float* orow = o.data() + r * d;
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) orow[e] *= rescale;
        }
        // rows past the block's end have zero scores -> probabilities of their own; their output is never stored
        multiply_accumulate(scores.data(), kBlockK, v_tile.data(), d, o.data(), d, kBlockQ, kBlockK, d);
      }
      T* out = static_cast<T*>(p.out) + b * p.out_layout.batch + (p.q_begin(b) + i0) * p.out_layout.token +
               h * p.out_layout.head;
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == 0.0f;
        const float inverse = empty ? 0.0f : 1.0f / l[r];
        for (int64_t e = 0; e < d; ++e) out[r * p.out_layout.token + e] = from_float<T>(o[r * d + e] * inverse);
        if (p.lse)
          p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + p.q_begin(b) + i0 + r] =
              empty ? inf : m[r] + std::log(l[r]);
      }
    }
  }
}

// -- backward --------------------------------------------------------------------------------------------

// The score of (i, j) as the forward computes it, and d score / d(q.k): scale, times 1 - tanh^2 under
// softcap (ALiBi is a constant).
// (In double: the backward's P = exp(score - lse) amplifies the score's rounding error by |score|.)
struct Score { double value, slope_of_dot; };

inline Score score_of(const Problem& p, double dot, int64_t i, int64_t j, int64_t sq, int64_t sk, float slope) {
  double s = dot * p.scale, derivative = p.scale;
  if (p.softcap > 0.0f) {
    const double t = std::tanh(s / p.softcap);
    s = p.softcap * t;
    derivative *= 1.0 - t * t;
  }
  if (p.alibi_slopes) s -= double(slope) * double(std::llabs(i + sk - sq - j));
  return Score{s, derivative};
}

// P_ij and dS_ij (times d score / d(q.k)) of one (query, key) pair, from q_i, k_j, dout_i, v_j.
struct PairGradient { double prob, ds; };

inline PairGradient pair_gradient(const Problem& p, const float* q, const float* k, const float* dout, const float* v,
                                  int64_t i, int64_t j, int64_t sq, int64_t sk, float slope, double lse, float delta) {
  double dot = 0.0, dp = 0.0;
  for (int64_t e = 0; e < p.head_dim; ++e) {
    dot += double(q[e]) * k[e];
    dp += double(dout[e]) * v[e];
  }
  const Score s = score_of(p, dot, i, j, sq, sk, slope);
  const double prob = std::exp(s.value - lse);
  return PairGradient{prob, prob * (dp - delta) * s.slope_of_dot};
}

// Index of query i of sequence b, head h in the lse layout (also used for D).
inline int64_t lse_index(const Problem& p, int64_t b, int64_t h, int64_t i) {
  return b * p.lse_batch_stride + h * p.lse_head_stride + p.q_begin(b) + i;
}

template <typename T>
void backward_typed(const Problem& p, const Gradients& g) {
  const int64_t d = p.head_dim, group = p.heads_q / p.heads_k;
  int64_t longest_q = p.cu_seqlens_q ? 0 : p.seqlen_q, longest_k = p.cu_seqlens_k ? 0 : p.seqlen_k;
  for (int64_t b = 0; p.cu_seqlens_q && b < p.batch; ++b) {
    longest_q = std::max(longest_q, p.q_length(b));
    longest_k = std::max(longest_k, p.k_length(b));
  }
  const int64_t total_q = p.cu_seqlens_q ? p.cu_seqlens_q[p.batch] : p.seqlen_q;
  const int64_t lse_size = p.cu_seqlens_q ? p.heads_q * total_q : p.batch * p.heads_q * p.seqlen_q;

  // D_i = dout_i . out_i - dlse_i
  std::vector<float> delta(size_t(lse_size), 0.0f);
#pragma omp parallel for schedule(static)
  for (int64_t bh = 0; bh < p.batch * p.heads_q; ++bh) {
    const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
    for (int64_t i = 0; i < p.q_length(b); ++i) {
      const int64_t token = p.q_begin(b) + i;
      const T* dout = static_cast<const T*>(g.dout) + b * g.dout_layout.batch + token * g.dout_layout.token + h * g.dout_layout.head;
      const T* out = static_cast<const T*>(g.out_values) + b * g.out_layout.batch + token * g.out_layout.token + h * g.out_layout.head;
      double sum = 0.0;
      for (int64_t e = 0; e < d; ++e) sum += double(to_float(dout[e])) * to_float(out[e]);
      const int64_t index = lse_index(p, b, h, i);
      delta[index] = float(sum - (g.dlse ? g.dlse[index] : 0.0f));
    }
  }

  // The log-sum-exp again, in double: the forward's float32 lse carries the float32 scores' rounding
  // (7 ulps measured at |lse| = 3.6 with softcap), and P = exp(score - lse) with double scores but that
  // lse sums to 1 only within it: dv came out at 2.2x PyTorch's float32 error. One more dot a pair.
  std::vector<double> lse64(size_t(lse_size), double(std::numeric_limits<float>::infinity()));
#pragma omp parallel
  {
    std::vector<float> q_row(d);
    std::vector<double> scores;
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < p.batch * p.heads_q; ++bh) {
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q, hk = h / group, sq = p.q_length(b), sk = p.k_length(b);
      const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
      for (int64_t i = 0; i < sq; ++i) {
        const KeyRange range = allowed_keys(i, sq, sk, p.mask);
        if (range.begin >= range.end) continue;
        const int64_t token = p.q_begin(b) + i;
        load_rows(static_cast<const T*>(p.q) + b * p.q_layout.batch + token * p.q_layout.token + h * p.q_layout.head,
                  p.q_layout.token, 1, d, q_row.data());
        scores.clear();
        double top = -std::numeric_limits<double>::infinity();
        for (int64_t j = range.begin; j < range.end; ++j) {
          const T* k = static_cast<const T*>(p.k) + b * p.k_layout.batch + (p.k_begin(b) + j) * p.k_layout.token +
                       hk * p.k_layout.head;
          double dot = 0.0;
          for (int64_t e = 0; e < d; ++e) dot += double(q_row[e]) * to_float(k[e]);
          scores.push_back(score_of(p, dot, i, j, sq, sk, slope).value);
          top = std::max(top, scores.back());
        }
        double sum = 0.0;
        for (double x : scores) sum += std::exp(x - top);
        lse64[lse_index(p, b, h, i)] = top + std::log(sum);
      }
    }
  }

  // dk, dv: one item per (sequence, kv head, key block), summing over every query head of its group.
  const int64_t k_blocks = (longest_k + kBlockK - 1) / kBlockK;
  const int64_t q_blocks = (longest_q + kBlockQ - 1) / kBlockQ;
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel
  {
    std::vector<float> k_tile(kBlockK * d), v_tile(kBlockK * d), q_tile(kBlockQ * d), do_tile(kBlockQ * d);
    std::vector<double> dk(kBlockK * d), dv(kBlockK * d), dq(kBlockQ * d);  // sums over many keys or queries
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < p.batch * p.heads_k * k_blocks; ++item) {
      const int64_t b = item / (p.heads_k * k_blocks), hk = (item / k_blocks) % p.heads_k;
      const int64_t j0 = (item % k_blocks) * kBlockK, sq = p.q_length(b), sk = p.k_length(b);
      if (j0 >= sk) continue;
      const int64_t cols = std::min(kBlockK, sk - j0);
      const int64_t key_token = p.k_begin(b) + j0;
      load_rows(static_cast<const T*>(p.k) + b * p.k_layout.batch + key_token * p.k_layout.token + hk * p.k_layout.head,
                p.k_layout.token, cols, d, k_tile.data());
      load_rows(static_cast<const T*>(p.v) + b * p.v_layout.batch + key_token * p.v_layout.token + hk * p.v_layout.head,
                p.v_layout.token, cols, d, v_tile.data());
      std::fill(dk.begin(), dk.end(), 0.0);
      std::fill(dv.begin(), dv.end(), 0.0);
      const KeyRange queries = queries_seeing(j0, j0 + cols, sq, sk, p.mask);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
        for (int64_t i0 = queries.begin; i0 < queries.end; i0 += kBlockQ) {
          const int64_t rows = std::min(kBlockQ, queries.end - i0), token = p.q_begin(b) + i0;
          load_rows(static_cast<const T*>(p.q) + b * p.q_layout.batch + token * p.q_layout.token + h * p.q_layout.head,
                    p.q_layout.token, rows, d, q_tile.data());
          load_rows(static_cast<const T*>(g.dout) + b * g.dout_layout.batch + token * g.dout_layout.token +
                        h * g.dout_layout.head, g.dout_layout.token, rows, d, do_tile.data());
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r, index = lse_index(p, b, h, i);
            const double lse = lse64[index];
            if (lse == inf) continue;  // a query with no key
            const KeyRange range = allowed_keys(i, sq, sk, p.mask);
            const float* qr = q_tile.data() + r * d;
            const float* dor = do_tile.data() + r * d;
            for (int64_t c = 0; c < cols; ++c) {
              const int64_t j = j0 + c;
              if (j < range.begin || j >= range.end) continue;
              const PairGradient pg = pair_gradient(p, qr, k_tile.data() + c * d, dor, v_tile.data() + c * d, i, j, sq,
                                                    sk, slope, lse, delta[index]);
              const double prob = pg.prob, ds = pg.ds;
              double* dkr = dk.data() + c * d;
              double* dvr = dv.data() + c * d;
#pragma omp simd
              for (int64_t e = 0; e < d; ++e) {
                dvr[e] += prob * dor[e];
                dkr[e] += ds * qr[e];
              }
            }
          }
        }
      }
      T* dk_out = static_cast<T*>(g.dk) + b * g.dk_layout.batch + key_token * g.dk_layout.token + hk * g.dk_layout.head;
      T* dv_out = static_cast<T*>(g.dv) + b * g.dv_layout.batch + key_token * g.dv_layout.token + hk * g.dv_layout.head;
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t e = 0; e < d; ++e) {
          dk_out[c * g.dk_layout.token + e] = from_float<T>(float(dk[c * d + e]));
          dv_out[c * g.dv_layout.token + e] = from_float<T>(float(dv[c * d + e]));
        }
    }

    // dq: one item per (sequence, query head, query block), as the forward.
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < p.batch * p.heads_q * q_blocks; ++item) {
      const int64_t b = item / (p.heads_q * q_blocks), h = (item / q_blocks) % p.heads_q;
      const int64_t i0 = (item % q_blocks) * kBlockQ, sq = p.q_length(b), sk = p.k_length(b);
      if (i0 >= sq) continue;
      const int64_t rows = std::min(kBlockQ, sq - i0), token = p.q_begin(b) + i0, hk = h / group;
      const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
      load_rows(static_cast<const T*>(p.q) + b * p.q_layout.batch + token * p.q_layout.token + h * p.q_layout.head,
                p.q_layout.token, rows, d, q_tile.data());
      load_rows(static_cast<const T*>(g.dout) + b * g.dout_layout.batch + token * g.dout_layout.token +
                    h * g.dout_layout.head, g.dout_layout.token, rows, d, do_tile.data());
      std::fill(dq.begin(), dq.end(), 0.0);
      const int64_t key_begin = allowed_keys(i0, sq, sk, p.mask).begin;
      const int64_t key_end = allowed_keys(i0 + rows - 1, sq, sk, p.mask).end;
      for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, key_end - j0), key_token = p.k_begin(b) + j0;
        load_rows(static_cast<const T*>(p.k) + b * p.k_layout.batch + key_token * p.k_layout.token + hk * p.k_layout.head,
                  p.k_layout.token, cols, d, k_tile.data());
        load_rows(static_cast<const T*>(p.v) + b * p.v_layout.batch + key_token * p.v_layout.token + hk * p.v_layout.head,
                  p.v_layout.token, cols, d, v_tile.data());
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r, index = lse_index(p, b, h, i);
          const double lse = lse64[index];
          if (lse == inf) continue;
          const KeyRange range = allowed_keys(i, sq, sk, p.mask);
          const float* qr = q_tile.data() + r * d;
          const float* dor = do_tile.data() + r * d;
          double* dqr = dq.data() + r * d;
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t j = j0 + c;
            if (j < range.begin || j >= range.end) continue;
            const float* kr = k_tile.data() + c * d;
            const double ds = pair_gradient(p, qr, kr, dor, v_tile.data() + c * d, i, j, sq, sk, slope, lse,
                                           delta[index]).ds;
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) dqr[e] += ds * kr[e];
          }
        }
      }
      T* dq_out = static_cast<T*>(g.dq) + b * g.dq_layout.batch + token * g.dq_layout.token + h * g.dq_layout.head;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t e = 0; e < d; ++e) dq_out[r * g.dq_layout.token + e] = from_float<T>(float(dq[r * d + e]));
    }
  }
}

}  // namespace

void backward_cpu(const Problem& problem, const Gradients& gradients) {
  dispatch_floating(problem.dtype, "attention backward (CPU kernel)", [&](auto tag) {
    backward_typed<typename decltype(tag)::type>(problem, gradients);
  });
}

void forward_cpu(const Problem& problem) {
  dispatch_floating(problem.dtype, "attention (CPU kernel)", [&](auto tag) {
    forward_typed<typename decltype(tag)::type>(problem);
  });
}

}  // namespace llmk::attention
