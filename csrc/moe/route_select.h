// The router's per-token arithmetic shared by the CPU and CUDA kernels (moe.h: route): top-k
// selection order, scores and weights from the selected logits.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/hd_math.h"

namespace llmk::moe {

// Whether (value a, index ia) is chosen before (value b, index ib): the larger logit, then the lower
// index; NaN logits after every number, among themselves by index (a total order, so the warp's
// arg-max converges whatever the lanes hold).
LLMK_HD bool ranks_before(float a, int ia, float b, int ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan == b_nan ? ia < ib : b_nan;
  return a > b || (a == b && ia < ib);
}

// The score of a selected logit: softmax exp(l - max) / sum (sum = sum over all experts of
// exp(l - max)), or sigmoid(l).
LLMK_HD float route_score(float logit, float max, float sum, bool sigmoid) {
  return sigmoid ? 1.0f / (1.0f + expf(-logit)) : expf(logit - max) / sum;
}

}  // namespace llmk::moe
