// The GEMM core's register-blocked CPU product, shared by the CPU kernels that multiply float tiles
// (the GEMM's, attention's): c[rows x cols] += a[rows x inner] · b[inner x cols], all row-major (b
// k-major: row k of b holds the k-th elements of the cols outputs), rows a multiple of 4, cols a
// multiple of 8 (gemm_cpu.cpp). Each output's products are summed `sum_chunk` at a time, each chunk's
// sum added to c: the caller picks the chain lengths that keep its fp32 error within PyTorch's (the
// GEMM 8, with a fresh c per k slice; attention 32, accumulating over key or query blocks in c).
#pragma once
#include <cstdint>

// Compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time: built for baseline x86-64
// alone, vector loops run 4-wide SSE.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LLMK_CPU_CLONES
#endif

namespace llmk::gemm {

void multiply_accumulate(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
                         float* __restrict c, int64_t ldc, int64_t rows, int64_t inner, int64_t cols,
                         int64_t sum_chunk);

}  // namespace llmk::gemm
