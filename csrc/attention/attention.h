// Flash-style attention (docs/attention.md; issue 10, in progress: the CPU forward exists, the
// backward and the CUDA kernels do not yet).
//
//   out[b, i, h] = sum_j P[i, j] v[b, j, h / group],  P = softmax_j(score(i, j)) over the allowed keys
//   score(i, j)  = softcap(q[b, i, h] . k[b, j, h / group] * scale) - slope[h] * |i + sk - sq - j|
//   lse[b, h, i] = log sum_j exp(score(i, j)) over the allowed keys
//
// with group = heads_q / heads_k (GQA/MQA), softcap(s) = cap * tanh(s / cap) when cap > 0, the ALiBi
// term when slopes are given, and the masks aligned bottom-right (flash-attn's convention): query i
// sits at key position i + sk - sq. A query with no allowed key gets out = 0 and lse = +inf (so that
// exp(score - lse) = 0 in a backward).
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/hd_math.h"
#include "core/backend.h"
#include "core/tensor.h"

namespace llmk::attention {

// Which keys each query may see: causal and/or a sliding window (left, right), -1 = unbounded.
struct Mask {
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
};

// The allowed keys [begin, end) of query i in a sequence of sq queries and sk keys (a contiguous
// range for every mask this library supports; empty when begin >= end). Monotone in i: begin and end
// never decrease as i grows, so a block of queries needs keys [range(first).begin, range(last).end),
// and only the key blocks that straddle a boundary need the per-element mask.
struct KeyRange { int64_t begin, end; };

LLMK_HD KeyRange allowed_keys(int64_t i, int64_t sq, int64_t sk, const Mask& mask) {
  const int64_t diagonal = i + sk - sq;                     // the key position aligned with query i
  const int64_t right = mask.causal ? 0 : mask.window_right;  // causal: no key right of the diagonal
  int64_t begin = 0, end = sk;
  if (right >= 0 && diagonal + right + 1 < end) end = diagonal + right + 1;
  if (mask.window_left >= 0 && diagonal - mask.window_left > begin) begin = diagonal - mask.window_left;
  if (begin > sk) begin = sk;
  if (end < begin) end = begin;
  return KeyRange{begin, end};
}

// The queries of a sequence that may see a key in [j0, j1): allowed_keys is monotone, so they are
// [first with end > j0, first with begin >= j1), found by binary search (a key block's query range
// in the backward).
LLMK_HD KeyRange queries_seeing(int64_t j0, int64_t j1, int64_t sq, int64_t sk, const Mask& mask) {
  int64_t lo = 0, hi = sq;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (allowed_keys(mid, sq, sk, mask).end > j0) hi = mid; else lo = mid + 1;
  }
  const int64_t first = lo;
  hi = sq;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (allowed_keys(mid, sq, sk, mask).begin >= j1) hi = mid; else lo = mid + 1;
  }
  return KeyRange{first, lo};
}

// Strides in elements of a (batch, token, head, head_dim) view; head_dim is contiguous. A packed
// varlen tensor (total, head, head_dim) has batch stride 0 and its sequences start at cu_seqlens[b].
struct Layout { int64_t batch, token, head; };

struct Problem {
  DType dtype = DType::bf16;        // of q, k, v and out
  int64_t batch = 0, heads_q = 0, heads_k = 0, head_dim = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;             // fixed length (ignored for varlen)
  const int32_t* cu_seqlens_q = nullptr;          // varlen: (batch + 1,) cumulative, else null
  const int32_t* cu_seqlens_k = nullptr;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;                            // may be null (not returned)
  Layout q_layout, k_layout, v_layout, out_layout;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // token stride 1
  float scale = 1.0f, softcap = 0.0f;
  Mask mask;
  const float* alibi_slopes = nullptr;             // (heads_q,) or (batch, heads_q)
  int64_t alibi_batch_stride = 0;

  // Sequence b's first token in the packed tensors and its lengths.
  LLMK_HD int64_t q_begin(int64_t b) const { return cu_seqlens_q ? cu_seqlens_q[b] : 0; }
  LLMK_HD int64_t k_begin(int64_t b) const { return cu_seqlens_k ? cu_seqlens_k[b] : 0; }
  LLMK_HD int64_t q_length(int64_t b) const { return cu_seqlens_q ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : seqlen_q; }
  LLMK_HD int64_t k_length(int64_t b) const { return cu_seqlens_k ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : seqlen_k; }
};

// Entry point (attention.cpp): validates the views, then runs the CPU kernel. cu_seqlens, lse and
// alibi_slopes may be null; with cu_seqlens, q/k/v/out are packed (total, heads, head_dim).
void forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* cu_seqlens_q,
             const TensorView* cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const TensorView& out,
             const TensorView* lse, double scale, double softcap, bool causal, int64_t window_left,
             int64_t window_right, const TensorView* alibi_slopes, void* stream);

void forward_cpu(const Problem& problem);
// attention_cuda.cu, compiled by nvcc (CudaStream) and for the emulator (EmuStream).
void forward_device(const Problem& problem, CudaStream stream);
void forward_device(const Problem& problem, EmuStream stream);

// Gradients (FlashAttention-2's backward, recomputing P = exp(score - lse) from the saved lse):
//   D_i = dout_i . out_i - dlse_i,  dP_ij = dout_i . v_j,  dS_ij = P_ij (dP_ij - D_i),
//   dscore/dqk = scale (times 1 - (score/cap)^2 under softcap), dq_i = sum_j dS_ij k_j, dk_j = sum_i dS_ij q_i,
//   dv_j = sum_i P_ij dout_i.
// dout, out and dq share q's layout; dk and dv share k's; dlse (optional) lse's.
struct Gradients {
  const void* dout = nullptr;
  const void* out_values = nullptr;  // the forward's out
  const float* lse = nullptr;        // the forward's lse (required)
  const float* dlse = nullptr;       // optional
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Layout dout_layout, out_layout, dq_layout, dk_layout, dv_layout;
  // The CUDA kernels' float32 workspaces (the CPU kernel needs none): delta_i in lse's layout, and
  // without `deterministic` dq's accumulator, zero-filled by the caller, shaped like q (contiguous;
  // dq_accum_layout its strides), that the key blocks add their dS K into with atomics.
  float* delta = nullptr;
  float* dq_accum = nullptr;
  Layout dq_accum_layout;
};

// `delta` (float32, lse's shape) is the CUDA kernels' workspace, and `dq_accum` (float32, q's shape,
// zero-filled) too when not `deterministic`; both may be null for the CPU kernel.
void backward(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
              const TensorView& out, const TensorView& lse, const TensorView* dlse, const TensorView* cu_seqlens_q,
              const TensorView* cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const TensorView& dq,
              const TensorView& dk, const TensorView& dv, double scale, double softcap, bool causal,
              int64_t window_left, int64_t window_right, const TensorView* alibi_slopes, bool deterministic,
              const TensorView* delta, const TensorView* dq_accum, void* stream);

void backward_cpu(const Problem& problem, const Gradients& gradients);
void backward_device(const Problem& problem, const Gradients& gradients, CudaStream stream);
void backward_device(const Problem& problem, const Gradients& gradients, EmuStream stream);

}  // namespace llmk::attention
