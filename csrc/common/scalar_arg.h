// A kernel argument given either by value or by a pointer to one element in the memory space the
// kernel runs in (a one-element tensor on the operands' device). Read by the kernel, so a value
// produced on the GPU (a seed, a loss-derived scale) needs no host synchronization, and a CUDA
// graph replay reads the element's current value.
#pragma once
#include "common/hd_math.h"

namespace llmk {

// `Stored` is the element type in memory when it differs from the type the kernel computes with:
// ScalarArg<uint64_t, int64_t> reads an int64 tensor element as its two's-complement pattern.
template <typename T, typename Stored = T>
struct ScalarArg {
  T value = T(0);
  const Stored* ptr = nullptr;
  LLMK_HD T get() const { return ptr ? T(*ptr) : value; }
};

}  // namespace llmk
