// Entry points of the Mixture-of-Experts family (moe.h): every check before any kernel runs.
#include "moe/moe.h"

#include "core/errors.h"

#include <string>
#include <utility>
#include <vector>

namespace llmk::moe {

void route(const TensorView& logits, int64_t top_k, bool renormalize, Scoring scoring, const TensorView& weights,
           const TensorView& expert_ids, const TensorView& tokens_per_expert, const TensorView& logsumexp,
           void* stream) {
  logits.check_ndim(2);
  logits.check_floating();
  const int64_t tokens = logits.shape[0], experts = logits.shape[1];
  LLMK_CHECK(experts >= 1 && experts <= kMaxExperts, ValueError, "router_logits must have 1 to ", kMaxExperts,
             " experts (columns); got shape ", logits.shape_str());
  LLMK_CHECK(experts <= 1 || logits.strides[1] == 1, ValueError,
             "router_logits must have a contiguous last dimension; got strides ", logits.strides_str());
  LLMK_CHECK(top_k >= 1 && top_k <= experts, ValueError, "top_k must be in [1, ", experts, "] (the number of experts); got ",
             top_k);
  const int scoring_code = static_cast<int>(scoring);
  LLMK_CHECK(scoring_code == 0 || scoring_code == 1, ValueError, "scoring must be 0 (softmax) or 1 (sigmoid); got ",
             scoring_code);
  weights.check_dtype(DType::f32);
  expert_ids.check_dtype(DType::i32);
  tokens_per_expert.check_dtype(DType::i32);
  logsumexp.check_dtype(DType::f32);
  for (const TensorView* t : {&weights, &expert_ids, &tokens_per_expert, &logsumexp}) {
    t->check_contiguous();
    t->check_same_device(logits);
  }
  weights.check_shape({tokens, top_k});
  expert_ids.check_shape({tokens, top_k});
  tokens_per_expert.check_shape({experts});
  logsumexp.check_shape({tokens});
  check_no_overlap({weights, expert_ids, tokens_per_expert, logsumexp}, {extent(logits)});
  LLMK_CHECK(tokens < (int64_t(1) << 31) / top_k, ValueError, "router_logits: ", tokens,
             " tokens x top_k ", top_k, " selections do not fit the int32 expert counts");
  RouteProblem p;
  p.dtype = logits.dtype;
  p.tokens = tokens;
  p.experts = experts;
  p.top_k = top_k;
  p.ld = tokens <= 1 ? experts : logits.strides[0];
  p.renormalize = renormalize;
  p.scoring = scoring;
  p.logits = logits.ptr;
  p.weights = weights.data<float>();
  p.expert_ids = expert_ids.data<int32_t>();
  p.tokens_per_expert = tokens_per_expert.data<int32_t>();
  p.logsumexp = logsumexp.data<float>();
  run_on_backend(logits, stream,
                 Operands().add(logits).add(weights).add(expert_ids).add(tokens_per_expert).add(logsumexp),
                 [&] { route_cpu(p); }, [&](auto device_stream) { route_device(p, device_stream); });
}

}  // namespace llmk::moe

namespace llmk::moe {

void permute(const TensorView& expert_ids, int64_t experts, int64_t block, const TensorView& expert_offsets,
             const TensorView& row_token, const TensorView& row_slot, const TensorView& block_expert,
             const TensorView& slot_row, const TensorView& workspace, void* stream) {
  expert_ids.check_dtype(DType::i32);
  expert_ids.check_ndim(2);
  expert_ids.check_contiguous();
  const int64_t tokens = expert_ids.shape[0], top_k = expert_ids.shape[1];
  LLMK_CHECK(experts >= 1 && experts <= kMaxExperts, ValueError, "num_experts must be in [1, ", kMaxExperts, "]; got ",
             experts);
  LLMK_CHECK(block >= 1 && block <= 1024, ValueError, "block must be in [1, 1024]; got ", block);
  const int64_t rows = permute_rows(tokens, top_k, experts, block);
  LLMK_CHECK(rows < (int64_t(1) << 31), ValueError, "expert_ids: ", tokens, " tokens x top_k ", top_k,
             " need ", rows, " rows, past int32 row indices");
  for (const TensorView* t : {&expert_offsets, &row_token, &row_slot, &block_expert, &slot_row, &workspace}) {
    t->check_dtype(DType::i32);
    t->check_contiguous();
    t->check_same_device(expert_ids);
  }
  expert_offsets.check_shape({experts + 1});
  row_token.check_shape({rows});
  row_slot.check_shape({rows});
  block_expert.check_shape({(rows + block - 1) / block});
  slot_row.check_shape({tokens, top_k});
  const int64_t workspace_needed =
      select_backend(expert_ids) == Backend::cpu ? 0 : permute_workspace(tokens, top_k, experts);
  LLMK_CHECK(workspace.numel() >= workspace_needed, ValueError, workspace.name, " must have at least ",
             workspace_needed, " elements (the CUDA kernels' per-chunk counts); got ", workspace.numel());
  check_no_overlap({expert_offsets, row_token, row_slot, block_expert, slot_row, workspace}, {expert_ids});
  if (expert_ids.device == DeviceType::cpu) {
    const int32_t* ids = expert_ids.data<int32_t>();
    for (int64_t i = 0; i < expert_ids.numel(); ++i)
      LLMK_CHECK(ids[i] >= 0 && ids[i] < experts, ValueError, "expert_ids must be in [0, ", experts,
                 ") (the number of experts); got ", ids[i], " at (", i / (top_k ? top_k : 1), ", ",
                 i % (top_k ? top_k : 1), ")");
  }
  PermuteProblem p;
  p.tokens = tokens;
  p.top_k = top_k;
  p.experts = experts;
  p.block = block;
  p.rows = rows;
  p.expert_ids = expert_ids.data<int32_t>();
  p.expert_offsets = expert_offsets.data<int32_t>();
  p.row_token = row_token.data<int32_t>();
  p.row_slot = row_slot.data<int32_t>();
  p.block_expert = block_expert.data<int32_t>();
  p.slot_row = slot_row.data<int32_t>();
  p.workspace = workspace.data<int32_t>();
  run_on_backend(expert_ids, stream,
                 Operands().add(expert_ids).add(expert_offsets).add(row_token).add(row_slot).add(block_expert)
                     .add(slot_row).add(workspace),
                 [&] { permute_cpu(p); }, [&](auto device_stream) { permute_device(p, device_stream); });
}

}  // namespace llmk::moe

namespace llmk::moe {

void grouped_gemm(const TensorView& a, const TensorView* a_rows, const TensorView& b, const TensorView& block_expert,
                  int64_t block, const TensorView* row_scale, gemm::Activation activation, bool b_k_major,
                  const TensorView& out, const TensorView* pre, void* stream) {
  a.check_ndim(2);
  b.check_ndim(3);
  out.check_ndim(2);
  const Backend backend = select_backend(a);
  LLMK_CHECK(a.dtype == DType::bf16 || a.dtype == DType::f16 || (a.dtype == DType::f32 && backend == Backend::cpu),
             TypeError, "x must be bfloat16 or float16 (float32 on the CPU kernel only); got ", dtype_name(a.dtype));
  b.check_same_dtype(a);
  for (const TensorView* t : {&b, &block_expert, &out, a_rows, row_scale})
    if (t) t->check_same_device(a);
  LLMK_CHECK(a.strides[1] == 1 || a.shape[1] <= 1, ValueError, "x must have a contiguous last dimension");
  b.check_contiguous();
  out.check_contiguous();
  const int64_t experts = b.shape[0], n = b.shape[b_k_major ? 2 : 1], k = b.shape[b_k_major ? 1 : 2];
  LLMK_CHECK(a.shape[1] == k, ValueError, "the expert weights' ", b_k_major ? "rows (" : "in_features (", k,
             ") must be x's last dimension ", a.shape[1]);
  LLMK_CHECK(n % 8 == 0 && k % 8 == 0 && n > 0 && k > 0, ValueError,
             "the expert weights' out_features and in_features must be positive multiples of 8; got ", b.shape_str());
  const int code = static_cast<int>(activation);
  LLMK_CHECK(activation == gemm::Activation::none || activation == gemm::Activation::gelu ||
                 activation == gemm::Activation::swiglu,
             ValueError, "activation must be none (0), gelu (2) or swiglu (3); got ", code);
  LLMK_CHECK(activation != gemm::Activation::swiglu || (n % 16 == 0 && !row_scale && !b_k_major), ValueError,
             "swiglu takes stacked [gate; up] weights (out_features 2F, F a multiple of 8), not k-major, and no row "
             "scale");
  LLMK_CHECK(block >= 1, ValueError, "block must be positive; got ", block);
  LLMK_CHECK(backend == Backend::cpu || block == kMoeBlock, ValueError, "the CUDA kernel's row blocks are ",
             kMoeBlock, " rows: permute with block=", kMoeBlock, "; got ", block);
  const int64_t rows = out.shape[0];
  LLMK_CHECK(out.dtype == a.dtype || out.dtype == DType::f32, TypeError, "out must be x's dtype or float32");
  out.check_shape({rows, activation == gemm::Activation::swiglu ? n / 2 : n});
  if (pre) {
    LLMK_CHECK((activation == gemm::Activation::swiglu || activation == gemm::Activation::gelu) && !b_k_major &&
                   out.dtype == a.dtype && !row_scale,
               ValueError, "pre (the saved pre-activation) goes with swiglu or gelu, weights (E, n, k), no row scale "
               "and out in x's dtype");
    pre->check_same_device(a);
    pre->check_same_dtype(a);
    pre->check_shape({rows, n});
    pre->check_contiguous();
    if (backend != Backend::cpu) pre->check_rows_aligned();
  }
  block_expert.check_dtype(DType::i32);
  block_expert.check_contiguous();
  block_expert.check_shape({(rows + block - 1) / block});
  if (a_rows) {
    a_rows->check_dtype(DType::i32);
    a_rows->check_contiguous();
    a_rows->check_shape({rows});
  } else {
    LLMK_CHECK(a.shape[0] == rows, ValueError, "x must have one row per output row (", rows, ") without row indices; got ",
               a.shape_str());
  }
  if (row_scale) {
    row_scale->check_dtype(DType::f32);
    row_scale->check_contiguous();
    row_scale->check_shape({rows});
  }
  std::vector<TensorView> read{extent(a), b, block_expert};
  for (const TensorView* t : {a_rows, row_scale})
    if (t) read.push_back(*t);
  if (pre) check_no_overlap({out, *pre}, read);
  else check_no_overlap({out}, read);
  if (backend != Backend::cpu)
    for (const TensorView* t : {&a, &b, &out}) t->check_rows_aligned();
  if (block_expert.device == DeviceType::cpu) {
    const int32_t* e = block_expert.data<int32_t>();
    for (int64_t i = 0; i < block_expert.numel(); ++i)
      LLMK_CHECK(e[i] >= -1 && e[i] < experts, ValueError, "block_expert must be in [-1, ", experts, "); got ", e[i]);
  }
  if (a_rows && a_rows->device == DeviceType::cpu) {
    const int32_t* r = a_rows->data<int32_t>();
    for (int64_t i = 0; i < rows; ++i)
      LLMK_CHECK(r[i] >= -1 && r[i] < a.shape[0], ValueError, "row_token must be -1 or a row of x in [0, ",
                 a.shape[0], "); got ", r[i]);
  }
  GroupedProblem p;
  p.dtype = a.dtype;
  p.out_dtype = out.dtype;
  p.rows = rows;
  p.n = n;
  p.k = k;
  p.experts = experts;
  p.block = block;
  p.lda = a.shape[0] <= 1 ? k : a.strides[0];
  p.a = a.ptr;
  p.a_rows = a_rows ? a_rows->data<int32_t>() : nullptr;
  p.b = b.ptr;
  p.block_expert = block_expert.data<int32_t>();
  p.row_scale = row_scale ? row_scale->data<float>() : nullptr;
  p.activation = activation;
  p.b_k_major = b_k_major;
  p.out = out.ptr;
  p.pre = pre ? pre->ptr : nullptr;
  if (rows == 0) return;
  run_on_backend(a, stream, Operands().add(a).add(a_rows).add(b).add(block_expert).add(row_scale).add(out).add(pre),
                 [&] { grouped_gemm_cpu(p); }, [&](auto device_stream) { grouped_gemm_device(p, device_stream); });
}

}  // namespace llmk::moe

namespace llmk::moe {

void weight_grad(const TensorView& a, const TensorView* a_rows, const TensorView& b, const TensorView* b_rows,
                 const TensorView& expert_offsets, const TensorView& out, void* stream) {
  a.check_ndim(2);
  b.check_ndim(2);
  out.check_ndim(3);
  const Backend backend = select_backend(a);
  LLMK_CHECK(a.dtype == DType::bf16 || a.dtype == DType::f16 || (a.dtype == DType::f32 && backend == Backend::cpu),
             TypeError, a.name, " must be bfloat16 or float16 (float32 on the CPU kernel only); got ",
             dtype_name(a.dtype));
  b.check_same_dtype(a);
  for (const TensorView* t : {&b, &expert_offsets, &out, a_rows, b_rows})
    if (t) t->check_same_device(a);
  for (const TensorView* t : {&a, &b})
    LLMK_CHECK(t->strides[1] == 1 || t->shape[1] <= 1, ValueError, t->name, " must have a contiguous last dimension");
  const int64_t m = a.shape[1], n = b.shape[1], experts = out.shape[0];
  LLMK_CHECK(m % 8 == 0 && n % 8 == 0 && m > 0 && n > 0, ValueError, a.name, " and ", b.name,
             " must have positive multiples of 8 columns; got ", a.shape_str(), " and ", b.shape_str());
  LLMK_CHECK(out.dtype == a.dtype || out.dtype == DType::f32, TypeError, out.name, " must be ", dtype_name(a.dtype),
             " or float32; got ", dtype_name(out.dtype));
  out.check_shape({experts, m, n});
  out.check_contiguous();
  LLMK_CHECK(experts >= 1 && experts <= kMaxExperts, ValueError, out.name, " must have 1 to ", kMaxExperts,
             " experts; got ", out.shape_str());
  const int64_t rows = a_rows ? a_rows->numel() : a.shape[0];
  const int64_t b_count = b_rows ? b_rows->numel() : b.shape[0];
  LLMK_CHECK(b_count == rows, ValueError, "the rows of ", a.name, " (", rows, ") and ", b.name, " (", b_count,
             "), through their row indices, must match");
  LLMK_CHECK(rows < (int64_t(1) << 31), ValueError, a.name, ": ", rows, " rows, past int32 row indices");
  for (const TensorView* t : {a_rows, b_rows})
    if (t) {
      t->check_dtype(DType::i32);
      t->check_ndim(1);
      t->check_contiguous();
    }
  expert_offsets.check_dtype(DType::i32);
  expert_offsets.check_contiguous();
  expert_offsets.check_shape({experts + 1});
  std::vector<TensorView> read{extent(a), extent(b), expert_offsets};
  for (const TensorView* t : {a_rows, b_rows})
    if (t) read.push_back(*t);
  check_no_overlap({out}, read);
  if (backend != Backend::cpu)
    for (const TensorView* t : {&a, &b, &out}) t->check_rows_aligned();
  if (expert_offsets.device == DeviceType::cpu) {
    const int32_t* o = expert_offsets.data<int32_t>();
    LLMK_CHECK(o[0] >= 0 && o[experts] <= rows, ValueError, "expert_offsets must run from 0 to at most ", rows,
               " (the rows); got ", o[0], " to ", o[experts]);
    for (int64_t e = 0; e <= experts; ++e)
      LLMK_CHECK((e == experts || o[e] <= o[e + 1]) && (backend == Backend::cpu || o[e] % kMoeBlock == 0),
                 ValueError, "expert_offsets must be non-decreasing", backend == Backend::cpu ? "" : " multiples of 64",
                 "; got ", o[e], e < experts ? " then " : "", e < experts ? std::to_string(o[e + 1]) : std::string(),
                 " at expert ", e);
  }
  for (auto [view, source] : {std::pair{a_rows, &a}, std::pair{b_rows, &b}})
    if (view && view->device == DeviceType::cpu) {
      const int32_t* r = view->data<int32_t>();
      for (int64_t i = 0; i < rows; ++i)
        LLMK_CHECK(r[i] >= -1 && r[i] < source->shape[0], ValueError, view->name, " must be -1 or a row of ",
                   source->name, " in [0, ", source->shape[0], "); got ", r[i]);
    }
  WeightGradProblem p;
  p.dtype = a.dtype;
  p.out_dtype = out.dtype;
  p.rows = rows;
  p.m = m;
  p.n = n;
  p.experts = experts;
  p.lda = a.shape[0] <= 1 ? m : a.strides[0];
  p.ldb = b.shape[0] <= 1 ? n : b.strides[0];
  p.a = a.ptr;
  p.a_rows = a_rows ? a_rows->data<int32_t>() : nullptr;
  p.b = b.ptr;
  p.b_rows = b_rows ? b_rows->data<int32_t>() : nullptr;
  p.expert_offsets = expert_offsets.data<int32_t>();
  p.out = out.ptr;
  run_on_backend(a, stream, Operands().add(a).add(a_rows).add(b).add(b_rows).add(expert_offsets).add(out),
                 [&] { weight_grad_cpu(p); }, [&](auto device_stream) { weight_grad_device(p, device_stream); });
}

}  // namespace llmk::moe

namespace llmk::moe {

void down_backward(const TensorView& dout, const TensorView& row_token, const TensorView& w_down,
                   const TensorView& block_expert, const TensorView& pre, const TensorView& row_weight,
                   gemm::Activation activation, const TensorView& dpre, const TensorView& weighted_h,
                   const TensorView& dweight_parts, void* stream) {
  dout.check_ndim(2);
  w_down.check_ndim(3);
  pre.check_ndim(2);
  const Backend backend = select_backend(dout);
  LLMK_CHECK(dout.dtype == DType::bf16 || dout.dtype == DType::f16 ||
                 (dout.dtype == DType::f32 && backend == Backend::cpu),
             TypeError, "dout must be bfloat16 or float16 (float32 on the CPU kernel only); got ",
             dtype_name(dout.dtype));
  for (const TensorView* t : {&w_down, &pre, &dpre, &weighted_h}) t->check_same_dtype(dout);
  for (const TensorView* t : {&row_token, &w_down, &block_expert, &pre, &row_weight, &dpre, &weighted_h,
                              &dweight_parts})
    t->check_same_device(dout);
  LLMK_CHECK(activation == gemm::Activation::swiglu || activation == gemm::Activation::gelu, ValueError,
             "activation must be gelu (2) or swiglu (3); got ", static_cast<int>(activation));
  const int64_t experts = w_down.shape[0], hidden = w_down.shape[1], ffn = w_down.shape[2];
  LLMK_CHECK(hidden % 8 == 0 && ffn % 8 == 0 && hidden > 0 && ffn > 0, ValueError,
             "w_down's hidden and ffn must be positive multiples of 8; got ", w_down.shape_str());
  LLMK_CHECK(dout.shape[1] == hidden && (dout.strides[1] == 1 || hidden <= 1), ValueError,
             "dout must be (T, ", hidden, ") with a contiguous last dimension; got ", dout.shape_str());
  const int64_t rows = row_token.numel();
  const int64_t pre_columns = activation == gemm::Activation::swiglu ? 2 * ffn : ffn;
  row_token.check_dtype(DType::i32);
  row_token.check_shape({rows});
  block_expert.check_dtype(DType::i32);
  block_expert.check_shape({(rows + kMoeBlock - 1) / kMoeBlock});
  row_weight.check_dtype(DType::f32);
  row_weight.check_shape({rows});
  pre.check_shape({rows, pre_columns});
  dpre.check_shape({rows, pre_columns});
  weighted_h.check_shape({rows, ffn});
  dweight_parts.check_dtype(DType::f32);
  dweight_parts.check_shape({rows, down_parts(ffn)});
  for (const TensorView* t : {&row_token, &block_expert, &row_weight, &pre, &dpre, &weighted_h, &dweight_parts,
                              &w_down})
    t->check_contiguous();
  check_no_overlap({dpre, weighted_h, dweight_parts}, {extent(dout), row_token, w_down, block_expert, pre, row_weight});
  if (backend != Backend::cpu)
    for (const TensorView* t : {&dout, &w_down, &pre, &dpre, &weighted_h}) t->check_rows_aligned();
  LLMK_CHECK(rows < (int64_t(1) << 31), ValueError, "row_token: ", rows, " rows, past int32 row indices");
  if (block_expert.device == DeviceType::cpu) {
    const int32_t* e = block_expert.data<int32_t>();
    for (int64_t i = 0; i < block_expert.numel(); ++i)
      LLMK_CHECK(e[i] >= -1 && e[i] < experts, ValueError, "block_expert must be in [-1, ", experts, "); got ", e[i]);
    const int32_t* r = row_token.data<int32_t>();
    for (int64_t i = 0; i < rows; ++i)
      LLMK_CHECK(r[i] >= -1 && r[i] < dout.shape[0], ValueError, "row_token must be -1 or a row of dout in [0, ",
                 dout.shape[0], "); got ", r[i]);
  }
  DownBackwardProblem p;
  p.dz.dtype = dout.dtype;
  p.dz.out_dtype = DType::f32;
  p.dz.rows = rows;
  p.dz.n = ffn;
  p.dz.k = hidden;
  p.dz.experts = experts;
  p.dz.block = kMoeBlock;
  p.dz.lda = dout.shape[0] <= 1 ? hidden : dout.strides[0];
  p.dz.a = dout.ptr;
  p.dz.a_rows = row_token.data<int32_t>();
  p.dz.b = w_down.ptr;
  p.dz.block_expert = block_expert.data<int32_t>();
  p.dz.b_k_major = true;
  p.pre = pre.ptr;
  p.row_weight = row_weight.data<float>();
  p.activation = activation;
  p.dpre = dpre.ptr;
  p.weighted_h = weighted_h.ptr;
  p.dweight_parts = dweight_parts.data<float>();
  if (rows == 0) return;
  run_on_backend(dout, stream,
                 Operands().add(dout).add(row_token).add(w_down).add(block_expert).add(pre).add(row_weight).add(dpre)
                     .add(weighted_h).add(dweight_parts),
                 [&] { down_backward_cpu(p); }, [&](auto device_stream) { down_backward_device(p, device_stream); });
}

}  // namespace llmk::moe
