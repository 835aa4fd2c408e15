// The CPU kernels of attention (attention.h): FlashAttention-2's algorithm in fp32 with OpenMP,
// never materializing the seqlen_q x seqlen_k scores.
//
// Forward: OpenMP over (sequence, query head, block of kBlockQ queries). For each block, the keys its
// queries may see are one range [range(first).begin, range(last).end) (allowed_keys is monotone); they
// are walked in blocks of kBlockK: S = Q Kᵀ * scale, softcap, ALiBi, the per-element mask only where a
// key block straddles a query's range, then the running max m, sum l and output O are rescaled:
//   m' = max(m, max_j S_ij),  l' = l e^(m - m') + sum_j e^(S_ij - m'),  O' = O e^(m - m') + sum_j e^(S_ij - m') V_j
// and at the end out = O / l, lse = m + log l (out = 0, lse = +inf for a query with no key).
//
// Backward: one pass per (sequence, kv head) that recomputes P = exp(score - lse) and forms dv, dk and
// dq with no atomics and no reduction across threads (deterministic); see backward_typed.
// Both are made of one register-blocked product (multiply_accumulate) and a vectorizable exp.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "common/float_types.h"
#include "core/dispatch.h"
#include "gemm/cpu_block.h"

namespace llmk::attention {
namespace {

constexpr int64_t kBlockQ = 32;
constexpr int64_t kBlockK = 64;

// The exp loop, compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (gemm/
// cpu_block.h): built for baseline x86-64 alone it ran 4-wide SSE. The products are the GEMM core's
// register-blocked CPU block, gemm::multiply_accumulate.
using gemm::multiply_accumulate;
constexpr int64_t kSumChunk = 32;   // its chains (cpu_block.h): the products it adds into a block's sums

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
        multiply_accumulate(q_tile.data(), d, k_transposed.data(), kBlockK, scores.data(), kBlockK, kBlockQ, d, kBlockK, kSumChunk);
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
        multiply_accumulate(scores.data(), kBlockK, v_tile.data(), d, o.data(), d, kBlockQ, kBlockK, d, kSumChunk);
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

// The square transposed: dst[c * rows + r] = src[r * cols + c] (Pᵀ and dSᵀ as the left operand).
inline void transpose(const float* __restrict src, int64_t rows, int64_t cols, float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// One item per (sequence, kv head): for each query head of its group, each key block and each block
// of queries that sees it,
//   S = Q Kᵀ (the forward's products, so the same bits), P = exp(score - lse), dP = dO Vᵀ,
//   dS = P (dP - delta) dscore/d(q.k),  dV += Pᵀ dO,  dK += dSᵀ Q,  dQ += dS K,
// FlashAttention-2's five products in one pass, each register-blocked like the forward's. dk and dv
// are sums over the group's heads inside one item, and dq over the key blocks inside one item: no
// atomics, no reduction across threads, deterministic. P is consistent with the forward's lse because
// S is computed by the same code in the same order (its chunked sums do not depend on the tiling).
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
  auto lse_index = [&](int64_t b, int64_t h, int64_t i) {
    return b * p.lse_batch_stride + h * p.lse_head_stride + p.q_begin(b) + i;
  };

  // delta_i = dout_i . out_i - dlse_i
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
      const int64_t index = lse_index(b, h, i);
      delta[index] = float(sum - (g.dlse ? g.dlse[index] : 0.0f));
    }
  }

  const bool plain = p.softcap <= 0.0f && !p.alibi_slopes;
  const int64_t padded_q = (longest_q + kBlockQ - 1) / kBlockQ * kBlockQ;
  const int64_t padded_k = (longest_k + kBlockK - 1) / kBlockK * kBlockK;
#pragma omp parallel
  {
    std::vector<float> k_tile(kBlockK * d), k_transposed(d * kBlockK), v_transposed(d * kBlockK);
    std::vector<float> q_tile(kBlockQ * d), do_tile(kBlockQ * d);
    std::vector<float> probs(kBlockQ * kBlockK), dprobs(kBlockQ * kBlockK), transposed(kBlockK * kBlockQ);
    std::vector<float> dq(padded_q * d), dk(padded_k * d), dv(padded_k * d);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < p.batch * p.heads_k; ++item) {
      const int64_t b = item / p.heads_k, hk = item % p.heads_k, sq = p.q_length(b), sk = p.k_length(b);
      if (sk == 0) continue;
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dv.begin(), dv.end(), 0.0f);
      const T* k = static_cast<const T*>(p.k) + b * p.k_layout.batch + p.k_begin(b) * p.k_layout.token + hk * p.k_layout.head;
      const T* v = static_cast<const T*>(p.v) + b * p.v_layout.batch + p.k_begin(b) * p.v_layout.token + hk * p.v_layout.head;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        std::fill(dq.begin(), dq.end(), 0.0f);
        const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
        const T* q = static_cast<const T*>(p.q) + b * p.q_layout.batch + p.q_begin(b) * p.q_layout.token + h * p.q_layout.head;
        const T* dout = static_cast<const T*>(g.dout) + b * g.dout_layout.batch + p.q_begin(b) * g.dout_layout.token +
                        h * g.dout_layout.head;
        for (int64_t j0 = 0; j0 < sk; j0 += kBlockK) {
          const int64_t cols = std::min(kBlockK, sk - j0);
          const KeyRange queries = queries_seeing(j0, j0 + cols, sq, sk, p.mask);
          if (queries.begin >= queries.end) continue;
          load_tile(k + j0 * p.k_layout.token, p.k_layout.token, cols, kBlockK, d, k_tile.data(), false);
          load_tile(k + j0 * p.k_layout.token, p.k_layout.token, cols, kBlockK, d, k_transposed.data(), true);
          load_tile(v + j0 * p.v_layout.token, p.v_layout.token, cols, kBlockK, d, v_transposed.data(), true);
          for (int64_t i0 = queries.begin / kBlockQ * kBlockQ; i0 < queries.end; i0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, sq - i0);
            load_tile(q + i0 * p.q_layout.token, p.q_layout.token, rows, kBlockQ, d, q_tile.data(), false);
            load_tile(dout + i0 * g.dout_layout.token, g.dout_layout.token, rows, kBlockQ, d, do_tile.data(), false);
            std::fill(probs.begin(), probs.end(), 0.0f);
            std::fill(dprobs.begin(), dprobs.end(), 0.0f);
            multiply_accumulate(q_tile.data(), d, k_transposed.data(), kBlockK, probs.data(), kBlockK, kBlockQ, d,
                                kBlockK, kSumChunk);
            multiply_accumulate(do_tile.data(), d, v_transposed.data(), kBlockK, dprobs.data(), kBlockK, kBlockQ, d,
                                kBlockK, kSumChunk);
            const bool masked = cols < kBlockK || j0 < allowed_keys(i0 + rows - 1, sq, sk, p.mask).begin ||
                                j0 + kBlockK > allowed_keys(i0, sq, sk, p.mask).end;
            for (int64_t r = 0; r < kBlockQ; ++r) {
              float* s = probs.data() + r * kBlockK;
              float* ds = dprobs.data() + r * kBlockK;
              if (r >= rows) {  // padding rows: no gradient
                std::fill(s, s + kBlockK, 0.0f);
                std::fill(ds, ds + kBlockK, 0.0f);
                continue;
              }
              const int64_t i = i0 + r, index = lse_index(b, h, i);
              const float lse = p.lse[index], delta_i = delta[index];
              if (plain && !masked) {
#pragma omp simd
                for (int64_t c = 0; c < kBlockK; ++c) {
                  const float prob = exp_nonpositive(s[c] * p.scale - lse);
                  s[c] = prob;
                  ds[c] = prob * (ds[c] - delta_i) * p.scale;
                }
                continue;
              }
              const KeyRange range = allowed_keys(i, sq, sk, p.mask);
              for (int64_t c = 0; c < kBlockK; ++c) {
                const int64_t j = j0 + c;
                if (j < range.begin || j >= range.end) {
                  s[c] = ds[c] = 0.0f;
                  continue;
                }
                // the forward's score, and d score / d(q.k): scale, times 1 - tanh^2 under softcap
                float score = s[c] * p.scale, dscore = p.scale;
                if (p.softcap > 0.0f) {
                  const float t = std::tanh(score / p.softcap);
                  score = p.softcap * t;
                  dscore *= (1.0f - t) * (1.0f + t);  // 1 - t^2, accurate near saturation
                }
                if (p.alibi_slopes) score -= slope * float(std::llabs(i + sk - sq - j));
                const float prob = exp_nonpositive(score - lse);
                s[c] = prob;
                ds[c] = prob * (ds[c] - delta_i) * dscore;
              }
            }
            transpose(probs.data(), kBlockQ, kBlockK, transposed.data());
            multiply_accumulate(transposed.data(), kBlockQ, do_tile.data(), d, dv.data() + j0 * d, d, kBlockK, kBlockQ, d, kSumChunk);
            transpose(dprobs.data(), kBlockQ, kBlockK, transposed.data());
            multiply_accumulate(transposed.data(), kBlockQ, q_tile.data(), d, dk.data() + j0 * d, d, kBlockK, kBlockQ, d, kSumChunk);
            multiply_accumulate(dprobs.data(), kBlockK, k_tile.data(), d, dq.data() + i0 * d, d, kBlockQ, kBlockK, d, kSumChunk);
          }
        }
        T* dq_out = static_cast<T*>(g.dq) + b * g.dq_layout.batch + p.q_begin(b) * g.dq_layout.token + h * g.dq_layout.head;
        for (int64_t i = 0; i < sq; ++i)
          for (int64_t e = 0; e < d; ++e) dq_out[i * g.dq_layout.token + e] = from_float<T>(dq[i * d + e]);
      }
      T* dk_out = static_cast<T*>(g.dk) + b * g.dk_layout.batch + p.k_begin(b) * g.dk_layout.token + hk * g.dk_layout.head;
      T* dv_out = static_cast<T*>(g.dv) + b * g.dv_layout.batch + p.k_begin(b) * g.dv_layout.token + hk * g.dv_layout.head;
      for (int64_t j = 0; j < sk; ++j)
        for (int64_t e = 0; e < d; ++e) {
          dk_out[j * g.dk_layout.token + e] = from_float<T>(dk[j * d + e]);
          dv_out[j * g.dv_layout.token + e] = from_float<T>(dv[j * d + e]);
        }
    }
  }
  // A sequence with no key: its queries' gradients are zero (the items above skip it).
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.k_length(b) != 0) continue;
    for (int64_t h = 0; h < p.heads_q; ++h) {
      T* dq_out = static_cast<T*>(g.dq) + b * g.dq_layout.batch + p.q_begin(b) * g.dq_layout.token + h * g.dq_layout.head;
      for (int64_t i = 0; i < p.q_length(b); ++i)
        for (int64_t e = 0; e < d; ++e) dq_out[i * g.dq_layout.token + e] = from_float<T>(0.0f);
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
