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

// Reductions over the four lanes of a quad (lanes 4g..4g+3): the lanes that hold one row of an mma
// C fragment (common/mma.h), so a row's max or sum over a warp's tile.
template <typename T, typename Op>
LLMK_DEVICE T quad_reduce(T value, Op op) {
  value = op(value, __shfl_xor_sync(0xffffffffu, value, 1));
  return op(value, __shfl_xor_sync(0xffffffffu, value, 2));
}

template <typename T>
LLMK_DEVICE T quad_sum(T value) {
  return quad_reduce(value, [](T a, T b) { return a + b; });
}

template <typename T>
LLMK_DEVICE T quad_max(T value) {
  return quad_reduce(value, [](T a, T b) { return a > b ? a : b; });
}

}  // namespace llmk
