// CPU kernels of the int8 paths beside W8A8's product (quant_cpu.cpp): per-token int8 quantization
// (quant.h: quantize_per_token), one row at a time with quant_format.h's arithmetic (the same bits as
// the CUDA kernel and as the Python weight path); and W8A16 (int8_weight_linear).
#include <cmath>
#include <vector>

#include "common/float_types.h"
#include "common/quant_format.h"
#include "core/dispatch.h"
#include "quant/quant.h"

namespace llmk::quant {

void quantize_per_token_cpu(const TokenQuantProblem& p) {
  dispatch<float, bf16, f16>(p.x_dtype, "quantize_per_token (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < p.m; ++row) {
      const T* x = static_cast<const T*>(p.x) + row * p.ldx;
      auto value = [&](int64_t column) {
        const float v = to_float(x[column]);
        return p.smooth ? div_rn(v, p.smooth[column]) : v;
      };
      float absmax = 0.0f;
      for (int64_t column = 0; column < p.k; ++column) absmax = nan_max(absmax, std::fabs(value(column)));
      const float scale = int8_scale(absmax);
      for (int64_t column = 0; column < p.k; ++column) p.codes[row * p.k + column] = int8_code(value(column), scale);
      p.scales[row] = scale;
    }
  });
}

// W8A16: x rows converted to float once; each (row, column) dot product in float over chunks of 256
// (eight interleaved partial sums the compiler vectorizes), the chunks added in double, then times
// the column's scale, plus bias, rounded once to x's dtype.
void int8_weight_linear_cpu(const Int8WeightProblem& p) {
  dispatch<float, bf16, f16>(p.x_dtype, "int8_linear W8A16 (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    std::vector<float> xf(size_t(p.m * p.k));
    for (int64_t row = 0; row < p.m; ++row)
      for (int64_t column = 0; column < p.k; ++column)
        xf[size_t(row * p.k + column)] = to_float(static_cast<const T*>(p.x)[row * p.ldx + column]);
    T* out = static_cast<T*>(p.out);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < p.n; ++n) {
      const int8_t* w = p.w + n * p.k;
      for (int64_t row = 0; row < p.m; ++row) {
        const float* x = xf.data() + row * p.k;
        double total = 0.0;
        for (int64_t c0 = 0; c0 < p.k; c0 += 256) {
          const int64_t c1 = c0 + 256 < p.k ? c0 + 256 : p.k;  // k is a multiple of 8
          float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int64_t c = c0; c < c1; c += 8)
            for (int l = 0; l < 8; ++l) partial[l] += x[c + l] * float(w[c + l]);
          for (int l = 0; l < 8; ++l) total += partial[l];
        }
        float v = float(total) * p.w_scales[n];
        if (p.bias) v += p.bias[n];
        out[row * p.n + n] = from_float<T>(v);
      }
    }
  });
}

}  // namespace llmk::quant
