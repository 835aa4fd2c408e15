// CPU kernels of the Mixture-of-Experts family (moe.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/float_types.h"
#include "core/dispatch.h"
#include "core/errors.h"
#include "moe/moe.h"
#include "moe/route_select.h"

namespace llmk::moe {

// One token at a time: the max and the sum of exp(l - max) over its experts, then k passes picking the
// best logit not yet taken (ranks_before), as the CUDA kernel does with a warp per token.
void route_cpu(const RouteProblem& p) {
  std::vector<int32_t> counts(size_t(p.experts), 0);
  dispatch<float, bf16, f16>(p.dtype, "route (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
#pragma omp parallel
    {
      std::vector<float> row(size_t(p.experts));
      std::vector<char> taken(size_t(p.experts));
      std::vector<int32_t> local(size_t(p.experts), 0);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < p.tokens; ++t) {
        const T* logits = static_cast<const T*>(p.logits) + t * p.ld;
        float max = -INFINITY;
        for (int64_t e = 0; e < p.experts; ++e) {
          row[size_t(e)] = to_float(logits[e]);
          max = row[size_t(e)] > max ? row[size_t(e)] : max;
        }
        double total_exp = 0.0;   // (in double: a float running sum over 256 experts drifts past torch's pairwise one)
        for (int64_t e = 0; e < p.experts; ++e) total_exp += expf(row[size_t(e)] - max);
        const float sum = float(total_exp);
        p.logsumexp[t] = max + logf(sum);
        float total = 0.0f;
        std::fill(taken.begin(), taken.end(), 0);
        for (int64_t j = 0; j < p.top_k; ++j) {
          int best = -1;
          for (int e = 0; e < int(p.experts); ++e)
            if (!taken[size_t(e)] && (best < 0 || ranks_before(row[size_t(e)], e, row[size_t(best)], best))) best = e;
          const float score = route_score(row[size_t(best)], max, sum, p.scoring == Scoring::sigmoid);
          p.expert_ids[t * p.top_k + j] = best;
          p.weights[t * p.top_k + j] = score;
          total += score;
          ++local[size_t(best)];
          taken[size_t(best)] = 1;
        }
        if (p.renormalize)
          for (int64_t j = 0; j < p.top_k; ++j) p.weights[t * p.top_k + j] /= total;
      }
#pragma omp critical
      for (int64_t e = 0; e < p.experts; ++e) counts[size_t(e)] += local[size_t(e)];
    }
  });
  for (int64_t e = 0; e < p.experts; ++e) p.tokens_per_expert[e] = counts[size_t(e)];
}

}  // namespace llmk::moe

namespace llmk::moe {

// In pair order: counts, padded offsets, then each pair at its expert's next row (stable), the rest
// of the rows padding.
void permute_cpu(const PermuteProblem& p) {
  std::vector<int64_t> counts(size_t(p.experts), 0), next(size_t(p.experts));
  const int64_t pairs = p.tokens * p.top_k;
  for (int64_t i = 0; i < pairs; ++i) ++counts[size_t(p.expert_ids[i])];
  int64_t offset = 0;
  for (int64_t e = 0; e < p.experts; ++e) {
    p.expert_offsets[e] = int32_t(offset);
    next[size_t(e)] = offset;
    offset += (counts[size_t(e)] + p.block - 1) / p.block * p.block;
  }
  p.expert_offsets[p.experts] = int32_t(offset);
  std::fill(p.row_token, p.row_token + p.rows, -1);
  std::fill(p.row_slot, p.row_slot + p.rows, -1);
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t row = next[size_t(p.expert_ids[i])]++;
    p.row_token[row] = int32_t(i / p.top_k);
    p.row_slot[row] = int32_t(i % p.top_k);
    p.slot_row[i] = int32_t(row);
  }
  int64_t e = 0;
  for (int64_t b = 0; b * p.block < p.rows; ++b) {
    const int64_t start = b * p.block;
    while (e < p.experts && p.expert_offsets[e + 1] <= start) ++e;
    p.block_expert[b] = start < offset ? int32_t(e) : -1;
  }
}

}  // namespace llmk::moe

namespace llmk::moe {

// Every row of out is written (zeros past the last expert). Runs of consecutive blocks of one expert, each through the GEMM core's CPU kernel on its real rows
// (gathered rows: the leading ones with a row index; the expert's padding rows after them are zeros).
// swiglu: the gate and up halves as two float32 products, then silu(g) u rounded once to out's type.
void grouped_gemm_cpu(const GroupedProblem& p) {
  const int64_t blocks = (p.rows + p.block - 1) / p.block;
  const int64_t a_size = dtype_size(p.dtype), out_size = dtype_size(p.out_dtype);
  const bool swiglu = p.activation == gemm::Activation::swiglu;
  const int64_t out_cols = swiglu ? p.n / 2 : p.n;
  for (int64_t b0 = 0; b0 < blocks;) {
    const int32_t e = p.block_expert[b0];
    int64_t b1 = b0 + 1;
    while (b1 < blocks && p.block_expert[b1] == e) ++b1;
    const int64_t r0 = b0 * p.block, r1 = std::min(b1 * p.block, p.rows);
    b0 = b1;
    char* out = static_cast<char*>(p.out) + r0 * out_cols * out_size;
    char* pre = p.pre ? static_cast<char*>(p.pre) + r0 * p.n * a_size : nullptr;
    if (e < 0) {   // past the last expert: zeros
      std::fill(out, out + (r1 - r0) * out_cols * out_size, char(0));
      if (pre) std::fill(pre, pre + (r1 - r0) * p.n * a_size, char(0));
      continue;
    }
    int64_t real = r1 - r0;
    if (p.a_rows) {
      for (real = 0; r0 + real < r1 && p.a_rows[r0 + real] >= 0;) ++real;
      for (int64_t r = r0 + real; r < r1; ++r)
        LLMK_CHECK(p.a_rows[r] < 0, ValueError, "row_token: the CPU kernel takes an expert's padding rows (-1) after "
                   "its real rows (permute's layout); row ", r, " holds ", p.a_rows[r], " after a -1");
    }
    std::fill(out + real * out_cols * out_size, out + (r1 - r0) * out_cols * out_size, char(0));   // padding rows
    if (pre) std::fill(pre + real * p.n * a_size, pre + (r1 - r0) * p.n * a_size, char(0));
    if (real == 0) continue;
    gemm::Problem g;
    g.dtype = p.dtype;
    g.m = real;
    g.k = p.k;
    g.a = p.a_rows ? p.a : static_cast<const char*>(p.a) + r0 * p.lda * a_size;
    g.lda = p.lda;
    g.a_rows = p.a_rows ? p.a_rows + r0 : nullptr;
    g.ldb = p.b_k_major ? p.n : p.k;
    g.b_k_major = p.b_k_major;
    const char* weight = static_cast<const char*>(p.b) + int64_t(e) * p.n * p.k * a_size;
    if (!swiglu && !pre) {
      g.out_dtype = p.out_dtype;
      g.n = p.n;
      g.b = weight;
      g.out = out;
      g.ldo = p.n;
      g.row_scale = p.row_scale ? p.row_scale + r0 : nullptr;
      g.activation = p.activation;
      gemm::gemm_cpu(g);
      continue;
    }
    // swiglu, or gelu with the pre-activation kept: the products in float32, then the outputs
    const int64_t f = swiglu ? p.n / 2 : p.n;
    std::vector<float> gate(size_t(real * f)), up(swiglu ? size_t(real * f) : 0);
    g.out_dtype = DType::f32;
    g.n = f;
    g.ldo = f;
    g.b = weight;
    g.out = gate.data();
    gemm::gemm_cpu(g);
    if (swiglu) {
      g.b = weight + f * p.k * a_size;
      g.out = up.data();
      gemm::gemm_cpu(g);
    }
    dispatch<float, bf16, f16>(p.out_dtype, "grouped_gemm out", [&](auto tag) {
      using O = typename decltype(tag)::type;
      O* o = reinterpret_cast<O*>(out);
      for (int64_t i = 0; i < real * f; ++i) {
        const float v = gate[size_t(i)];
        o[i] = from_float<O>(swiglu ? gemm::silu(v) * up[size_t(i)] : gemm::gelu(v));
      }
      if (pre) {   // (out has pre's dtype then): (g, u) pairs interleaved, or a
        O* q = reinterpret_cast<O*>(pre);
        for (int64_t i = 0; i < real * f; ++i) {
          if (swiglu) {
            q[2 * i] = from_float<O>(gate[size_t(i)]);
            q[2 * i + 1] = from_float<O>(up[size_t(i)]);
          } else {
            q[i] = from_float<O>(gate[size_t(i)]);
          }
        }
      }
    });
  }
}

// dZ by the grouped GEMM's CPU kernel (k-major weights, gathered dout rows) in float32, then the
// epilogue of the CUDA kernel row by row (moe.h: activation_backward), each part's columns summed in order.
void down_backward_cpu(const DownBackwardProblem& p) {
  std::vector<float> dz(size_t(p.dz.rows * p.dz.n));
  GroupedProblem g = p.dz;
  g.out = dz.data();
  grouped_gemm_cpu(g);
  const bool swiglu = p.activation == gemm::Activation::swiglu;
  const int64_t ffn = p.dz.n, ld = swiglu ? 2 * ffn : ffn, parts = down_parts(ffn);
  dispatch<float, bf16, f16>(p.dz.dtype, "down_backward (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < p.dz.rows; ++r) {
      const T* saved = static_cast<const T*>(p.pre) + r * ld;
      T* dpre = static_cast<T*>(p.dpre) + r * ld;
      T* weighted_h = static_cast<T*>(p.weighted_h) + r * ffn;
      float* part = p.dweight_parts + r * parts;
      std::fill(part, part + parts, 0.0f);
      const float w = p.row_weight[r];
      for (int64_t c = 0; c < ffn; ++c) {
        const float z = dz[size_t(r * ffn + c)];
        const float a = to_float(saved[swiglu ? 2 * c : c]), u = swiglu ? to_float(saved[2 * c + 1]) : 0.0f;
        const ColumnGrad d = activation_backward<T>(swiglu, a, u, z, w);
        dpre[c] = from_float<T>(d.d_first);
        if (swiglu) dpre[ffn + c] = from_float<T>(d.d_up);
        weighted_h[c] = from_float<T>(w * d.h);
        part[c / kDownPartColumns] += z * d.h;
      }
    }
  });
}

}  // namespace llmk::moe

namespace llmk::moe {

// Per expert: its rows of A and B transposed into float (m, K_e) and (n, K_e) panels (gathered rows
// through the indices, zeros for -1, K_e rounded up to 8 with zero columns), then the GEMM core's
// CPU kernel on them in float32 (out = panel_a · panel_bᵀ), rounded once into out's dtype.
void weight_grad_cpu(const WeightGradProblem& p) {
  const int64_t out_size = dtype_size(p.out_dtype);
  dispatch<float, bf16, f16>(p.dtype, "weight_grad (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto panel = [&](const void* base, int64_t ld, const int32_t* index, int64_t cols, int64_t r0, int64_t count,
                     int64_t width, std::vector<float>& dst) {
      dst.assign(size_t(cols * width), 0.0f);
      const T* src = static_cast<const T*>(base);
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < count; ++r) {
        const int64_t row = index ? int64_t(index[r0 + r]) : r0 + r;
        if (row < 0) continue;
        for (int64_t c = 0; c < cols; ++c) dst[size_t(c * width + r)] = to_float(src[row * ld + c]);
      }
    };
    std::vector<float> a_panel, b_panel, sums;
    for (int64_t e = 0; e < p.experts; ++e) {
      const int64_t r0 = p.expert_offsets[e], count = p.expert_offsets[e + 1] - r0;
      char* out = static_cast<char*>(p.out) + e * p.m * p.n * out_size;
      if (count == 0) {
        std::fill(out, out + p.m * p.n * out_size, char(0));
        continue;
      }
      const int64_t width = (count + 7) / 8 * 8;
      panel(p.a, p.lda, p.a_rows, p.m, r0, count, width, a_panel);
      panel(p.b, p.ldb, p.b_rows, p.n, r0, count, width, b_panel);
      gemm::Problem g;
      g.dtype = DType::f32;
      g.out_dtype = DType::f32;
      g.m = p.m;
      g.n = p.n;
      g.k = width;
      g.a = a_panel.data();
      g.lda = width;
      g.b = b_panel.data();
      g.ldb = width;
      g.ldo = p.n;
      if (p.out_dtype != DType::f32) sums.resize(size_t(p.m * p.n));
      g.out = p.out_dtype == DType::f32 ? static_cast<void*>(out) : sums.data();
      gemm::gemm_cpu(g);
      if (p.out_dtype != DType::f32)
        dispatch<bf16, f16>(p.out_dtype, "weight_grad out", [&](auto out_tag) {
          using O = typename decltype(out_tag)::type;
          O* o = reinterpret_cast<O*>(out);
          for (int64_t i = 0; i < p.m * p.n; ++i) o[i] = from_float<O>(sums[size_t(i)]);
        });
    }
  });
}

}  // namespace llmk::moe
