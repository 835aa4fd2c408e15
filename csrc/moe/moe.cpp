// Entry points of the Mixture-of-Experts family (moe.h): every check before any kernel runs.
#include "moe/moe.h"

#include "core/errors.h"

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
