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
