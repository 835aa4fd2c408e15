// Warp-wide reductions by butterfly shuffles: every lane of the (full) warp gets the result.
#pragma once
#include "common/device.h"

namespace llmk {

template <typename T, typename Op>
LLMK_DEVICE T warp_reduce(T value, Op op) {
  LLMK_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

template <typename T>
LLMK_DEVICE T warp_sum(T value) {
  return warp_reduce(value, [](T a, T b) { return a + b; });
}

template <typename T>
LLMK_DEVICE T warp_max(T value) {
  return warp_reduce(value, [](T a, T b) { return a > b ? a : b; });
}

}  // namespace llmk
