// Which segment owns item `item`, given the sorted start offsets of the segments: the search that
// a multi-tensor launch (block b -> tensor) and a grouped GEMM (row block -> expert) both need.
#pragma once
#include "common/hd_math.h"

namespace llmk {

// `begins[0..count]` are nondecreasing prefix sums (begins[0] <= item < begins[count]); returns the
// largest s < count with begins[s] <= item, i.e. the segment holding `item`. Empty segments
// (begins[s] == begins[s + 1]) are never returned. O(log count), no divergence in the loop bounds.
template <typename Index>
LLMK_HD int find_segment(const Index* begins, int count, Index item) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (begins[mid] <= item) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace llmk
