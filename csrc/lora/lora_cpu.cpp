// CPU kernel of the LoRA family (lora.h): the shrink, then the base and expand products through the
// GEMM core's CPU kernel in float32, added with the bias and rounded once (the CUDA kernels' sums, in
// another order).
#include <algorithm>
#include <vector>

#include "common/float_types.h"
#include "core/dispatch.h"
#include "lora/lora.h"
#include "quant/quant.h"

namespace llmk::lora {

namespace {

// out (m, n) float32 (row stride ldo) += a · b for a (m, k) of T with row stride lda, b (n, k) row-major
// with row stride ldb, or (k, n) with k_major (row stride ldb), through the GEMM core's CPU kernel.
void add_product(DType dtype, int64_t m, const void* a, int64_t lda, const void* b, int64_t ldb, bool k_major,
                 int64_t n, int64_t k, float* out, int64_t ldo) {
  if (m == 0 || n == 0) return;
  gemm::Problem g;
  g.dtype = dtype;
  g.out_dtype = DType::f32;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a;
  g.lda = lda;
  g.b = b;
  g.ldb = ldb;
  g.b_k_major = k_major;
  g.out = out;
  g.ldo = ldo;
  g.accumulate = true;
  gemm::gemm_cpu(g);
}

// out (m, n) float32 = a · b (add_product's operands).
void product(DType dtype, int64_t m, const void* a, int64_t lda, const void* b, int64_t ldb, bool k_major, int64_t n,
             int64_t k, std::vector<float>& out) {
  out.assign(size_t(m * n), 0.0f);
  add_product(dtype, m, a, lda, b, ldb, k_major, n, k, out.data(), n);
}

// The transposed product (one adapter): u = scale dy B into shrink (M, r), out = dy W + u A.
template <typename T>
void transposed(const Problem& p, std::vector<float>& acc) {
  std::vector<float> u;
  product(p.dtype, p.m, p.x, p.ldx, p.lora_b, p.rank, true, p.rank, p.in_features, u);
  T* shrink = static_cast<T*>(p.shrink);
  for (size_t e = 0; e < u.size(); ++e) shrink[e] = from_float<T>(p.scale * u[e]);
  product(p.dtype, p.m, p.x, p.ldx, p.weight, p.out_features, true, p.out_features, p.in_features, acc);
  add_product(p.dtype, p.m, shrink, p.rank, p.lora_a, p.out_features, true, p.out_features, p.rank, acc.data(),
              p.out_features);
}

// The forward: per adapter (the rows using it, gathered when rows pick adapters) and slice, the
// shrink s = scale x_lora A[l, s, :rank]ᵀ rounded into shrink, then its expand s B[l, slice rows,
// :rank]ᵀ added to the base product x Wᵀ.
template <typename T>
void forward(const Problem& p, std::vector<float>& acc) {
  const int64_t k = p.in_features, n = p.out_features, columns = p.slices * p.rank;
  T* shrink = static_cast<T*>(p.shrink);
  std::fill(shrink, shrink + p.m * columns, from_float<T>(0.0f));
  if (p.int4) {   // the quantized GEMM's CPU kernel, into float32
    acc.assign(size_t(p.m * n), 0.0f);
    quant::Int4Problem q;
    q.x_dtype = p.dtype;
    q.scale_dtype = p.w_scale_dtype;
    q.m = p.m;
    q.n = n;
    q.k = k;
    q.group_size = p.group_size;
    q.x = p.x;
    q.ldx = p.ldx;
    q.packed = static_cast<const int32_t*>(p.weight);
    q.scales = p.w_scales;
    q.zeros = p.w_zeros;
    q.out = acc.data();
    q.out_f32 = true;
    quant::int4_linear_cpu(q);
  } else {
    product(p.dtype, p.m, p.x, p.ldx, p.weight, k, false, n, k, acc);
  }
  // rows[l]: the kernels' rows (x's rows through row_order) using adapter l
  std::vector<std::vector<int64_t>> rows(size_t(p.adapters));
  for (int64_t i = 0; i < p.m; ++i) {
    const int32_t adapter = p.adapter_ids ? p.adapter_ids[i] : 0;
    if (adapter >= 0 && adapter < p.adapters && p.x_row(i) >= 0) rows[size_t(adapter)].push_back(i);
  }
  std::vector<T> gathered, s_rows;
  std::vector<float> s, expand;
  for (int64_t l = 0; l < p.adapters; ++l) {
    const std::vector<int64_t>& mine = rows[size_t(l)];
    const int64_t count = int64_t(mine.size()), rank = p.rank_of(int32_t(l));
    if (count == 0 || rank == 0) continue;
    const T* x = static_cast<const T*>(p.x_lora);
    int64_t ldx = p.ld_lora;
    if (p.adapter_ids) {   // (one adapter for all rows: x_lora as it is)
      gathered.resize(size_t(count * k));
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = p.x_row(mine[size_t(i)]);
        std::copy(x + row * ldx, x + row * ldx + k, gathered.begin() + i * k);
      }
      x = gathered.data();
      ldx = k;
    }
    s_rows.resize(size_t(count * rank));
    for (int64_t slice = 0; slice < p.slices; ++slice) {
      const T* a = static_cast<const T*>(p.lora_a) + (l * p.slices + slice) * p.rank * k;
      product(p.dtype, count, x, ldx, a, k, false, rank, k, s);
      const float scale = p.scale_of(int32_t(l), slice);
      for (int64_t i = 0; i < count; ++i)
        for (int64_t j = 0; j < rank; ++j) {
          const T v = from_float<T>(scale * s[size_t(i * rank + j)]);
          shrink[mine[size_t(i)] * columns + slice * p.rank + j] = v;
          s_rows[size_t(i * rank + j)] = v;
        }
      const int64_t lo = p.slice_offsets[slice], width = p.slice_offsets[slice + 1] - lo;
      const T* b = static_cast<const T*>(p.lora_b) + (l * n + lo) * p.rank;
      if (!p.adapter_ids) {   // every row, in order: the expand added in place
        add_product(p.dtype, count, s_rows.data(), rank, b, p.rank, false, width, rank, acc.data() + lo, n);
        continue;
      }
      product(p.dtype, count, s_rows.data(), rank, b, p.rank, false, width, rank, expand);
      for (int64_t i = 0; i < count; ++i)
        for (int64_t j = 0; j < width; ++j) acc[size_t(p.x_row(mine[size_t(i)]) * n + lo + j)] += expand[size_t(i * width + j)];
    }
  }
}

}  // namespace

// The CUDA kernels' sums in float32 (in another order), with the bias, rounded once.
void lora_linear_cpu(const Problem& p) {
  dispatch<float, bf16, f16>(p.dtype, "lora_linear (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    std::vector<float> acc;
    if (p.transposed) transposed<T>(p, acc);
    else forward<T>(p, acc);
    T* out = static_cast<T*>(p.out);
    const int64_t n = p.out_features;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = 0; j < n; ++j) out[i * n + j] = from_float<T>(acc[size_t(i * n + j)] + (p.bias ? p.bias[j] : 0.0f));
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
