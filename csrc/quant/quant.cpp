// Entry points of the quantized GEMM family (quant.h): every check before any kernel runs.
#include "quant/quant.h"

#include "common/quant_format.h"
#include "core/errors.h"

namespace llmk::quant {
namespace {

// codes (N, K) uint8 and packed (N / 8, ceil(K / 32), 32) int32, on one device, contiguous.
void check_int4_pair(const TensorView& codes, const TensorView& packed) {
  codes.check_dtype(DType::u8);
  codes.check_ndim(2);
  codes.check_contiguous();
  packed.check_dtype(DType::i32);
  packed.check_contiguous();
  packed.check_same_device(codes);
  const int64_t n = codes.shape[0], k = codes.shape[1];
  LLMK_CHECK(n % 8 == 0 && k % 8 == 0, ValueError, codes.name, " must have N and K multiples of 8; got shape ",
             codes.shape_str());
  packed.check_shape({n / kInt4BlockN, int4_k_blocks(k), 32});
  LLMK_CHECK(select_backend(codes) == Backend::cpu, DeviceError,
             "int4 pack/unpack run on the CPU kernel only so far: the CUDA kernel (and so the emulated backend) "
             "is not written yet (issue 11)");
}

}  // namespace

void pack_int4(const TensorView& codes, const TensorView& packed, void* stream) {
  check_int4_pair(codes, packed);
  check_no_overlap({packed}, {codes});
  const uint8_t* c = codes.data<uint8_t>();
  for (int64_t i = 0; i < codes.numel(); ++i)
    LLMK_CHECK(c[i] <= 15, ValueError, codes.name, " must hold 4-bit codes in [0, 15]; got ", int(c[i]),
               " at flat index ", i);
  (void)stream;
  pack_int4_cpu(c, codes.shape[0], codes.shape[1], packed.data<int32_t>());
}

void unpack_int4(const TensorView& packed, const TensorView& codes, void* stream) {
  check_int4_pair(codes, packed);
  check_no_overlap({codes}, {packed});
  (void)stream;
  unpack_int4_cpu(packed.data<int32_t>(), codes.shape[0], codes.shape[1], codes.data<uint8_t>());
}

}  // namespace llmk::quant
