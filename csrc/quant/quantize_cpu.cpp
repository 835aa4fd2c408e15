// The CPU kernel of per-token int8 quantization (quant.h: quantize_per_token): one row at a time,
// quant_format.h's arithmetic (the same bits as the CUDA kernel and as the Python weight path).
#include <cmath>

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

}  // namespace llmk::quant
