// Mixture-of-Experts (docs/moe.md; issue 12, in progress): so far the router, one kernel per backend.
//
// route: per token t, over the E router logits l[t, :] in float32,
//   scores   softmax(l) (or sigmoid(l) elementwise)
//   top-k    the k largest logits, which are the k largest scores (both maps are increasing), in
//            descending order; equal logits: the lower expert index first (torch.topk's order on the
//            CPU). Selecting on the logits makes the choice independent of how the scores round.
//   weights  the selected scores, divided by their sum when `renormalize`
//   stats    tokens_per_expert[e] += 1 for every selection, logsumexp[t] = log sum exp l[t, :]
#pragma once
#include <cstdint>

#include "core/backend.h"
#include "core/tensor.h"

namespace llmk::moe {

enum class Scoring : int { softmax = 0, sigmoid = 1 };

// logits (T, E) fp32/bf16/fp16 with a contiguous last dimension; weights float32 (T, k), expert_ids
// int32 (T, k), tokens_per_expert int32 (E,) (overwritten), logsumexp float32 (T,); 1 <= k <= E <= 1024.
void route(const TensorView& logits, int64_t top_k, bool renormalize, Scoring scoring, const TensorView& weights,
           const TensorView& expert_ids, const TensorView& tokens_per_expert, const TensorView& logsumexp,
           void* stream);

constexpr int64_t kMaxExperts = 1024;

struct RouteProblem {
  DType dtype = DType::f32;
  int64_t tokens = 0, experts = 0, top_k = 0, ld = 0;
  bool renormalize = true;
  Scoring scoring = Scoring::softmax;
  const void* logits = nullptr;
  float* weights = nullptr;
  int32_t* expert_ids = nullptr;
  int32_t* tokens_per_expert = nullptr;
  float* logsumexp = nullptr;
};

void route_cpu(const RouteProblem& problem);
void route_device(const RouteProblem& problem, CudaStream stream);
void route_device(const RouteProblem& problem, EmuStream stream);

}  // namespace llmk::moe
