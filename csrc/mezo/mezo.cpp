#include "mezo/mezo.h"

#include <limits>

#include "core/errors.h"

namespace llmk::mezo {

void sweep(const std::vector<TensorView>& params, const std::vector<int64_t>& indices,
           const std::vector<double>& shrink, const std::vector<double>& coef_a,
           const std::vector<double>& coef_b, SweepScalars scalars, const TensorView* seed_tensor,
           const TensorView* grad_tensor, const TensorView* next_seed_tensor, void* stream) {
  LLMK_CHECK(!params.empty(), ValueError, "params must be a non-empty list of tensors");
  const size_t n = params.size();
  LLMK_CHECK(indices.size() == n && shrink.size() == n && coef_a.size() == n && coef_b.size() == n,
             ValueError, "indices, shrink, coef_a and coef_b must have one entry per tensor (", n,
             "); got ", indices.size(), ", ", shrink.size(), ", ", coef_a.size(), ", ", coef_b.size());
  const TensorView& first = params[0];
  for (size_t k = 0; k < n; ++k) {
    params[k].check_same_device(first);
    params[k].check_floating();  // density: check_no_overlap below
    LLMK_CHECK(indices[k] >= 0 && indices[k] <= std::numeric_limits<uint32_t>::max(), ValueError,
               "indices[", k, "] must be in [0, 2^32); got ", indices[k]);
  }
  select_backend(first);  // a CUDA tensor in a build without CUDA fails here, before any kernel
  auto scalar_pointer = [&](const TensorView* t, DType dtype) -> const void* {
    if (!t) return nullptr;
    t->check_same_device(first);
    t->check_dtype(dtype);
    t->check_numel(1);
    return t->ptr;
  };
  scalars.seed.ptr = static_cast<const int64_t*>(scalar_pointer(seed_tensor, DType::i64));
  scalars.next_seed.ptr = static_cast<const int64_t*>(scalar_pointer(next_seed_tensor, DType::i64));
  scalars.grad.ptr = static_cast<const float*>(scalar_pointer(grad_tensor, DType::f32));
  // No two parameters share memory, and no scalar lives inside a parameter: every CUDA block reads
  // the scalars while other blocks write the parameters.
  std::vector<TensorView> read;
  for (const TensorView* t : {seed_tensor, grad_tensor, next_seed_tensor})
    if (t) read.push_back(*t);
  check_no_overlap(params, read);

  // Everything is checked; now one kernel call per dtype present (usually one).
  for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
    std::vector<SweepTensor> group;
    for (size_t k = 0; k < n; ++k) {
      if (params[k].dtype != dtype || params[k].numel() == 0) continue;
      group.push_back(SweepTensor{params[k].ptr, params[k].numel(), uint32_t(indices[k]),
                                  float(shrink[k]), float(coef_a[k]), float(coef_b[k])});
    }
    if (group.empty()) continue;
    run_on_backend(first, stream, Operands().add(params).add(seed_tensor).add(grad_tensor).add(next_seed_tensor),
                   [&] { sweep_cpu(dtype, group, scalars); },
                   [&](auto device_stream) { sweep_device(dtype, group, scalars, device_stream); });
  }
}

}  // namespace llmk::mezo
