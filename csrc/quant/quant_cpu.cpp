// CPU kernels of the int4 format (quant.h): pack and unpack through quant_format.h's position
// function, OpenMP over blocks of 8 columns (each writes its own words).
#include <cstring>

#include "common/quant_format.h"
#include "quant/quant.h"

namespace llmk::quant {

void pack_int4_cpu(const uint8_t* codes, int64_t n, int64_t k, int32_t* packed) {
  const int64_t k_blocks = int4_k_blocks(k);
#pragma omp parallel for schedule(static)
  for (int64_t block = 0; block < n / kInt4BlockN; ++block) {
    uint32_t* words = reinterpret_cast<uint32_t*>(packed) + block * k_blocks * 32;
    std::memset(words, 0, size_t(k_blocks) * 32 * sizeof(uint32_t));  // padding past K: code 0
    for (int64_t row = block * kInt4BlockN; row < (block + 1) * kInt4BlockN; ++row)
      for (int64_t col = 0; col < k; ++col) {
        const Int4Position at = int4_position(row, col, k_blocks);
        reinterpret_cast<uint32_t*>(packed)[at.word] |= uint32_t(codes[row * k + col] & 0xf) << at.shift;
      }
  }
}

void unpack_int4_cpu(const int32_t* packed, int64_t n, int64_t k, uint8_t* codes) {
  const int64_t k_blocks = int4_k_blocks(k);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; ++row)
    for (int64_t col = 0; col < k; ++col) {
      const Int4Position at = int4_position(row, col, k_blocks);
      codes[row * k + col] = uint8_t((uint32_t(packed[at.word]) >> at.shift) & 0xf);
    }
}

}  // namespace llmk::quant
