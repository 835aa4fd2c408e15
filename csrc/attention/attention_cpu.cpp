// CPU forward of attention (attention.h): the blocked online softmax the CUDA kernel will use, in
// fp32, never materializing the seqlen_q x seqlen_k scores.
//
// OpenMP over (sequence, query head, block of kBlockQ queries). For each block, the keys its queries
// may see are one range [range(first).begin, range(last).end) (allowed_keys is monotone); they are
// walked in blocks of kBlockK: S = Q Kᵀ * scale, softcap, ALiBi, the per-element mask only where a key
// block straddles a query's range, then the running max m, sum l and output O are rescaled:
//   m' = max(m, max_j S_ij),  l' = l e^(m - m') + sum_j e^(S_ij - m'),  O' = O e^(m - m') + sum_j e^(S_ij - m') V_j
// and at the end out = O / l, lse = m + log l (out = 0, lse = +inf for a query with no key).
#include <cmath>
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

#pragma omp parallel
  {
    std::vector<float> q_tile(kBlockQ * d), k_tile(kBlockK * d), v_tile(kBlockK * d), scores(kBlockQ * kBlockK);
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

      load_rows(q, p.q_layout.token, rows, d, q_tile.data());
      std::fill(o.begin(), o.end(), 0.0f);
      std::fill(m.begin(), m.end(), -inf);
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t key_begin = allowed_keys(i0, sq, sk, p.mask).begin;
      const int64_t key_end = allowed_keys(i0 + rows - 1, sq, sk, p.mask).end;
      for (int64_t j0 = key_begin; j0 < key_end; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, key_end - j0);
        load_rows(k + j0 * p.k_layout.token, p.k_layout.token, cols, d, k_tile.data());
        load_rows(v + j0 * p.v_layout.token, p.v_layout.token, cols, d, v_tile.data());
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const KeyRange range = allowed_keys(i, sq, sk, p.mask);
          float* s = scores.data() + r * kBlockK;
          float block_max = -inf;
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t j = j0 + c;
            if (j < range.begin || j >= range.end) {
              s[c] = -inf;
              continue;
            }
            const float* qr = q_tile.data() + r * d;
            const float* kr = k_tile.data() + c * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < d; ++e) dot += qr[e] * kr[e];
            float score = dot * p.scale;
            if (p.softcap > 0.0f) score = p.softcap * std::tanh(score / p.softcap);
            if (p.alibi_slopes) score -= slope * float(std::llabs(i + sk - sq - j));
            s[c] = score;
            block_max = std::max(block_max, score);
          }
          if (block_max == -inf) continue;  // no allowed key of this row in this block
          const float new_max = std::max(m[r], block_max);
          const float rescale = std::exp(m[r] - new_max);  // 0 when m was -inf
          float sum = 0.0f;
          for (int64_t c = 0; c < cols; ++c) {
            s[c] = s[c] == -inf ? 0.0f : std::exp(s[c] - new_max);
            sum += s[c];
          }
          l[r] = l[r] * rescale + sum;
          m[r] = new_max;
          float* orow = o.data() + r * d;
          for (int64_t e = 0; e < d; ++e) orow[e] *= rescale;
          for (int64_t c = 0; c < cols; ++c) {
            const float pc = s[c];
            if (pc == 0.0f) continue;
            const float* vr = v_tile.data() + c * d;
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) orow[e] += pc * vr[e];
          }
        }
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

}  // namespace

void forward_cpu(const Problem& problem) {
  dispatch_floating(problem.dtype, "attention (CPU kernel)", [&](auto tag) {
    forward_typed<typename decltype(tag)::type>(problem);
  });
}

}  // namespace llmk::attention
