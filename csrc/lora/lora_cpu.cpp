// CPU kernel of the LoRA family (lora.h): the shrink, then the base and expand products through the
// GEMM core's CPU kernel in float32, added with the bias and rounded once (the CUDA kernel's sums, in
// another order).
#include <algorithm>
#include <vector>

#include "common/float_types.h"
#include "core/dispatch.h"
#include "lora/lora.h"

namespace llmk::lora {

void lora_linear_cpu(const Problem& p) {
  const int64_t r_pad = padded(p.rank), k_in = p.in_features, n_out = p.out_features;
  dispatch<float, bf16, f16>(p.dtype, "lora_linear (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // out (M, n) float32 = a · b, b (n, k) row-major, or (k, n) with k_major
    auto product = [&](const void* a, int64_t lda, const void* b, bool k_major, int64_t n, int64_t k,
                       std::vector<float>& out) {
      out.assign(size_t(p.m * n), 0.0f);
      gemm::Problem g;
      g.dtype = p.dtype;
      g.out_dtype = DType::f32;
      g.m = p.m;
      g.n = n;
      g.k = k;
      g.a = a;
      g.lda = lda;
      g.b = b;
      g.ldb = k_major ? n : k;
      g.b_k_major = k_major;
      g.out = out.data();
      g.ldo = n;
      gemm::gemm_cpu(g);
    };
    // forward: shrink by A (r, K), expand by B (N, r); transposed: shrink by B as (N, r) k-major,
    // expand by A as (r, K) k-major, the base by W as (N, K) k-major
    const void* shrink_by = p.transposed ? p.lora_b : p.lora_a;
    const void* expand_by = p.transposed ? p.lora_a : p.lora_b;
    std::vector<float> s, base, expand;
    product(p.x_lora, p.ld_lora, shrink_by, p.transposed, p.rank, k_in, s);
    T* shrink = static_cast<T*>(p.shrink);
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = 0; j < r_pad; ++j)
        shrink[i * r_pad + j] = j < p.rank ? from_float<T>(p.scale * s[size_t(i * p.rank + j)]) : from_float<T>(0.0f);
    product(p.x, p.ldx, p.weight, p.transposed, n_out, k_in, base);
    product(shrink, r_pad, expand_by, p.transposed, n_out, p.rank, expand);   // (s's first r columns)
    T* out = static_cast<T*>(p.out);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = 0; j < n_out; ++j) {
        const size_t e = size_t(i * n_out + j);
        out[e] = from_float<T>(base[e] + expand[e] + (p.bias ? p.bias[j] : 0.0f));
      }
  });
}

void dropout_cpu(const DropoutProblem& p) {
  dispatch<float, bf16, f16>(p.dtype, "dropout (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(p.out);
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < p.m * p.k / 4; ++g) {   // (K % 8 == 0: a group of 4 never straddles rows)
      const Philox4 words = dropout_words(p.seed, uint64_t(g));
      const int64_t row = 4 * g / p.k, col = 4 * g % p.k;
      for (int q = 0; q < 4; ++q) {
        const float v = to_float(x[row * p.ldx + col + q]);
        out[4 * g + q] = from_float<T>(words.x[q] >= p.threshold ? v * p.keep_scale : 0.0f);
      }
    }
  });
}

}  // namespace llmk::lora
