// Quantized GEMM (docs/quant.md; issue 11, in progress): so far the int4 format's pack and unpack
// (common/quant_format.h), CPU kernels only.
#pragma once
#include "core/backend.h"
#include "core/tensor.h"

namespace llmk::quant {

// codes: uint8 (N, K), every code in [0, 15], N and K multiples of 8 -> packed: int32 (N / 8,
// ceil(K / 32), 32) in the layout of quant_format.h (K padded with code 0).
void pack_int4(const TensorView& codes, const TensorView& packed, void* stream);
// The inverse: packed int32 (N / 8, ceil(K / 32), 32) -> codes uint8 (N, K).
void unpack_int4(const TensorView& packed, const TensorView& codes, void* stream);

void pack_int4_cpu(const uint8_t* codes, int64_t n, int64_t k, int32_t* packed);
void unpack_int4_cpu(const int32_t* packed, int64_t n, int64_t k, uint8_t* codes);

}  // namespace llmk::quant
