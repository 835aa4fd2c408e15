// Entry point of attention (attention.h): every check before any kernel runs.
#include "attention/attention.h"

#include <cmath>
#include <vector>

#include "core/errors.h"

namespace llmk::attention {
namespace {

Layout layout_of(const TensorView& t, bool varlen) {
  if (varlen) return Layout{0, t.strides[0], t.strides[1]};
  return Layout{t.strides[0], t.strides[1], t.strides[2]};
}

// cu_seqlens on the CPU: int32 (batch + 1,), 0 first, non-decreasing, ending at `total`, no sequence
// longer than `max_seqlen`. (For CUDA tensors, reading them would synchronize the host: the caller's
// contract, as in flash-attn.)
void check_cu_seqlens(const TensorView& cu, int64_t batch, int64_t total, int64_t max_seqlen, const char* max_name) {
  cu.check_dtype(DType::i32);
  cu.check_contiguous();
  cu.check_shape({batch + 1});
  if (cu.device != DeviceType::cpu) return;
  const int32_t* c = cu.data<int32_t>();
  LLMK_CHECK(c[0] == 0, ValueError, cu.name, "[0] must be 0; got ", c[0]);
  for (int64_t b = 0; b < batch; ++b) {
    LLMK_CHECK(c[b + 1] >= c[b], ValueError, cu.name, " must be non-decreasing; got ", c[b], " then ", c[b + 1],
               " at index ", b);
    LLMK_CHECK(c[b + 1] - c[b] <= max_seqlen, ValueError, "sequence ", b, " has ", c[b + 1] - c[b], " tokens (",
               cu.name, "), more than ", max_name, " = ", max_seqlen);
  }
  LLMK_CHECK(c[batch] == total, ValueError, cu.name, "[-1] must equal the packed tokens (", total, "); got ",
             c[batch]);
}

// t has `like`'s shape (a workspace).
void check_shape_like(const TensorView& t, const TensorView& like) {
  bool same = t.ndim == like.ndim;
  for (int i = 0; same && i < like.ndim; ++i) same = t.shape[i] == like.shape[i];
  LLMK_CHECK(same, ValueError, t.name, " must have ", like.name, "'s shape ", like.shape_str(), "; got ",
             t.shape_str());
}

// A tensor like `like`: same shape, dtype and device, contiguous last dimension (v like k, out like q,
// the gradients like their inputs).
void check_like(const TensorView& t, const TensorView& like) {
  t.check_same_dtype(like);
  t.check_same_device(like);
  check_shape_like(t, like);
  LLMK_CHECK(t.strides[t.ndim - 1] == 1, ValueError, t.name, " must have a contiguous last dimension; got strides ",
             t.strides_str());
}

// The checks the forward and the backward share; `out` is the forward's output (written by the forward,
// read by the backward), `lse` likewise.
Problem make_problem(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* cu_seqlens_q,
                     const TensorView* cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const TensorView& out,
                     const TensorView* lse, double scale, double softcap, bool causal, int64_t window_left,
                     int64_t window_right, const TensorView* alibi_slopes) {
  LLMK_CHECK((cu_seqlens_q == nullptr) == (cu_seqlens_k == nullptr), ValueError,
             "cu_seqlens_q and cu_seqlens_k must be given together");
  const bool varlen = cu_seqlens_q != nullptr;
  const int dims = varlen ? 3 : 4;
  for (const TensorView* t : {&q, &k}) {
    t->check_ndim(dims);
    t->check_floating();
    t->check_same_dtype(q);
    t->check_same_device(q);
    LLMK_CHECK(t->strides[dims - 1] == 1, ValueError, t->name, " must have a contiguous last dimension (head_dim); got strides ",
               t->strides_str());
  }
  const int64_t head_dim = q.shape[dims - 1], heads_q = q.shape[dims - 2], heads_k = k.shape[dims - 2];
  LLMK_CHECK(head_dim > 0 && head_dim <= 256 && head_dim % 8 == 0, ValueError,
             "head_dim must be a multiple of 8 up to 256; got ", head_dim);
  check_like(v, k);
  LLMK_CHECK(k.shape[dims - 1] == head_dim, ValueError, "k must have q's head_dim ", head_dim, "; got shape ",
             k.shape_str());
  LLMK_CHECK(heads_k > 0 && heads_q % heads_k == 0, ValueError, "q's heads (", heads_q,
             ") must be a multiple of k's heads (", heads_k, ")");
  check_like(out, q);
  LLMK_CHECK(std::isfinite(scale) && std::isfinite(softcap) && softcap >= 0.0, ValueError,
             "softmax_scale must be finite and softcap finite and >= 0; got ", scale, " and ", softcap);
  LLMK_CHECK(window_left >= -1 && window_right >= -1, ValueError, "window entries must be >= -1; got (", window_left,
             ", ", window_right, ")");

  Problem p;
  p.dtype = q.dtype;
  p.heads_q = heads_q;
  p.heads_k = heads_k;
  p.head_dim = head_dim;
  if (varlen) {
    p.batch = cu_seqlens_q->numel() - 1;
    LLMK_CHECK(p.batch >= 0, ValueError, cu_seqlens_q->name, " must have batch + 1 >= 1 entries");
    cu_seqlens_q->check_same_device(q);
    cu_seqlens_k->check_same_device(q);
    check_cu_seqlens(*cu_seqlens_q, p.batch, q.shape[0], max_seqlen_q, "max_seqlen_q");
    check_cu_seqlens(*cu_seqlens_k, p.batch, k.shape[0], max_seqlen_k, "max_seqlen_k");
    p.cu_seqlens_q = cu_seqlens_q->data<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data<int32_t>();
    p.seqlen_q = max_seqlen_q;
    p.seqlen_k = max_seqlen_k;
  } else {
    LLMK_CHECK(k.shape[0] == q.shape[0], ValueError, "k must have q's batch ", q.shape[0], "; got shape ",
               k.shape_str());
    p.batch = q.shape[0];
    p.seqlen_q = q.shape[1];
    p.seqlen_k = k.shape[1];
  }
  // (The CUDA kernels index a sequence's tokens in 32-bit arithmetic.)
  LLMK_CHECK(p.seqlen_q < (int64_t(1) << 30) && p.seqlen_k < (int64_t(1) << 30), ValueError,
             "sequences must be shorter than 2^30 tokens; got seqlen_q ", p.seqlen_q, " and seqlen_k ", p.seqlen_k);
  const int64_t total_q = varlen ? q.shape[0] : p.seqlen_q;
  if (lse) {
    lse->check_dtype(DType::f32);
    lse->check_contiguous();
    lse->check_same_device(q);
    if (varlen) lse->check_shape({heads_q, total_q});
    else lse->check_shape({p.batch, heads_q, p.seqlen_q});
    p.lse = lse->data<float>();
    p.lse_batch_stride = varlen ? 0 : heads_q * p.seqlen_q;
    p.lse_head_stride = total_q;
  }
  if (alibi_slopes) {
    alibi_slopes->check_dtype(DType::f32);
    alibi_slopes->check_contiguous();
    alibi_slopes->check_same_device(q);
    LLMK_CHECK((alibi_slopes->ndim == 1 && alibi_slopes->shape[0] == heads_q) ||
                   (alibi_slopes->ndim == 2 && alibi_slopes->shape[0] == p.batch && alibi_slopes->shape[1] == heads_q),
               ValueError, "alibi_slopes must have shape (", heads_q, ",) or (", p.batch, ", ", heads_q, "); got ",
               alibi_slopes->shape_str());
    p.alibi_slopes = alibi_slopes->data<float>();
    p.alibi_batch_stride = alibi_slopes->ndim == 2 ? heads_q : 0;
  }
  p.q = q.ptr;
  p.k = k.ptr;
  p.v = v.ptr;
  p.out = out.ptr;
  p.q_layout = layout_of(q, varlen);
  p.k_layout = layout_of(k, varlen);
  p.v_layout = layout_of(v, varlen);
  p.out_layout = layout_of(out, varlen);
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.mask = Mask{causal, window_left, window_right};
  if (select_backend(q) != Backend::cpu)
    for (const TensorView* t : {&q, &k, &v, &out}) t->check_rows_aligned();
  return p;
}

std::vector<TensorView> inputs_read(const TensorView& q, const TensorView& k, const TensorView& v,
                                    std::initializer_list<const TensorView*> others) {
  std::vector<TensorView> read{extent(q), extent(k), extent(v)};
  for (const TensorView* t : others)
    if (t) read.push_back(extent(*t));
  return read;
}


}  // namespace

void forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* cu_seqlens_q,
             const TensorView* cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const TensorView& out,
             const TensorView* lse, double scale, double softcap, bool causal, int64_t window_left,
             int64_t window_right, const TensorView* alibi_slopes, void* stream) {
  const Problem p = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, lse, scale,
                                 softcap, causal, window_left, window_right, alibi_slopes);
  std::vector<TensorView> written{extent(out)};
  if (lse) written.push_back(*lse);
  check_no_overlap(written, inputs_read(q, k, v, {cu_seqlens_q, cu_seqlens_k, alibi_slopes}));
  run_on_backend(q, stream, Operands().add(q).add(k).add(v).add(out).add(lse).add(cu_seqlens_q).add(cu_seqlens_k)
                                .add(alibi_slopes),
                 [&] { forward_cpu(p); }, [&](auto device_stream) { forward_device(p, device_stream); });
}

void backward(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
              const TensorView& out, const TensorView& lse, const TensorView* dlse, const TensorView* cu_seqlens_q,
              const TensorView* cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const TensorView& dq,
              const TensorView& dk, const TensorView& dv, double scale, double softcap, bool causal,
              int64_t window_left, int64_t window_right, const TensorView* alibi_slopes, bool deterministic,
              const TensorView* delta, const TensorView* dq_accum, void* stream) {
  const Problem p = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, &lse, scale,
                                 softcap, causal, window_left, window_right, alibi_slopes);
  check_like(dout, q);
  check_like(dq, q);
  check_like(dk, k);
  check_like(dv, k);
  if (dlse) {
    check_like(*dlse, lse);
    dlse->check_contiguous();
  }
  // The CUDA kernels' workspaces: delta like lse, and the dq accumulator like q (float32, zero-filled)
  // unless deterministic.
  const bool device_kernels = select_backend(q) != Backend::cpu;
  std::vector<TensorView> written{extent(dq), extent(dk), extent(dv)};
  if (device_kernels) {
    for (const TensorView* t : {&dout, &dq, &dk, &dv}) t->check_rows_aligned();
    LLMK_CHECK(delta, ValueError, "the CUDA backward needs the delta workspace");
    delta->check_dtype(DType::f32);
    delta->check_contiguous();
    delta->check_same_device(q);
    check_shape_like(*delta, lse);
    written.push_back(*delta);
    if (!deterministic) {
      LLMK_CHECK(dq_accum, ValueError, "the CUDA backward without `deterministic` needs the dq_accum workspace");
      dq_accum->check_dtype(DType::f32);
      dq_accum->check_contiguous();
      dq_accum->check_same_device(q);
      LLMK_CHECK(reinterpret_cast<uintptr_t>(dq_accum->ptr) % 16 == 0, ValueError,
                 "dq_accum must start at a 16-byte boundary (the kernels read it in 16-byte pieces)");
      check_shape_like(*dq_accum, q);
      written.push_back(*dq_accum);
    }
  }
  check_no_overlap(written,
                   inputs_read(q, k, v, {&dout, &out, &lse, dlse, cu_seqlens_q, cu_seqlens_k, alibi_slopes}));
  const bool varlen = cu_seqlens_q != nullptr;
  Gradients g;
  g.dout = dout.ptr;
  g.out_values = out.ptr;
  g.lse = lse.data<float>();
  g.dlse = dlse ? dlse->data<float>() : nullptr;
  g.dq = dq.ptr;
  g.dk = dk.ptr;
  g.dv = dv.ptr;
  g.dout_layout = layout_of(dout, varlen);
  g.out_layout = layout_of(out, varlen);
  g.dq_layout = layout_of(dq, varlen);
  g.dk_layout = layout_of(dk, varlen);
  g.dv_layout = layout_of(dv, varlen);
  if (device_kernels) {
    g.delta = delta->data<float>();
    if (!deterministic) {
      g.dq_accum = dq_accum->data<float>();
      g.dq_accum_layout = layout_of(*dq_accum, varlen);
    }
  }
  run_on_backend(q, stream,
                 Operands().add(dout).add(q).add(k).add(v).add(out).add(lse).add(dlse).add(cu_seqlens_q)
                     .add(cu_seqlens_k).add(alibi_slopes).add(dq).add(dk).add(dv).add(delta).add(dq_accum),
                 [&] { backward_cpu(p, g); }, [&](auto device_stream) { backward_device(p, g, device_stream); });
}

}  // namespace llmk::attention
