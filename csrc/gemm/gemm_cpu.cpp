// CPU kernel of the GEMM core (gemm.h): out = epilogue(A · Bᵀ) with fp32 accumulation.
//
// OpenMP over output tiles of kBlockRows x kBlockCols. Per tile and slice of kBlockK columns of k,
// the tile's rows of A (gathered through a_rows when given) are converted to float rows and its
// columns of B to a float k-major panel once, then multiply_accumulate (cpu_block.h: 4 x 16 outputs
// in vector registers, fused multiply-adds where the CPU has them) adds their product to the tile's
// fp32 sums. The epilogue runs in fp32 exactly as gemm.h writes it, and the result is rounded once
// (to nearest even) into out, or added to out's existing value and rounded once (accumulate).
#include <algorithm>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/float_types.h"
#include "core/dispatch.h"
#include "gemm/cpu_block.h"
#include "gemm/gemm.h"

namespace llmk::gemm {
namespace {

constexpr int64_t kBlockRows = 128;
constexpr int64_t kBlockCols = 120;   // a multiple of 8: swiglu's (gate, up) pairs never straddle tiles
constexpr int64_t kBlockK = 256;
constexpr int64_t kSumChunk = 8;   // (multiply_accumulate's chains: with a fresh sum per k slice, fp32 errors 0.5-0.9x
                                   // PyTorch's at K = 16 to 4096; 32 reached 1.7x at K = 4096)

// multiply_accumulate (cpu_block.h), register-blocked: 4 rows x 24 columns of c in vector registers
// (12 independent sums: fewer left the FMA's latency showing), each step one row of b (24 columns)
// times a broadcast element of 4 rows of a (attention's dots had
// reduced one key at a time, horizontally; the GEMM's, 2 x 4 outputs at a time).
// Fused multiply-adds where the CPU has them (these two functions alone opt into contraction: the
// build's -ffp-contract=off is for the random numbers that must match the GPU bit for bit, and a
// file-wide `#pragma GCC optimize` stopped the header helpers from inlining), and sums over at most
// sum_chunk products added to c one chunk at a time: in attention one chain of 256 steps (head_dim
// 256) made the fp32 output 3.4x PyTorch's error, 2.3x with fused multiply-adds. Compiled for AVX-512, AVX2 and
// baseline x86-64, picked at load time. Measured in attention (2-core AVX2 EPYC, fp32, causal, batch 2,
// 8 heads): 0.73x and 0.65x CPU SDPA at (seqlen 512, head_dim 64) and (1024, 128), from 0.31x and 0.24x
// with per-key dot products and a scalar exp (0.54x and 0.55x with a separate multiply and add).
typedef float Vec8 __attribute__((vector_size(32)));
typedef float UnalignedVec8 __attribute__((vector_size(32), aligned(4)));  // a plain (vmovups) load or store

// (always_inline: compiled on its own, it was built once for baseline x86-64 and the AVX2 clone of
// its caller ran SSE code at 2.6 GFLOP/s.)
template <int Width>
__attribute__((always_inline, optimize("fp-contract=fast"))) inline void multiply_block(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
                           float* __restrict c, int64_t ldc, int64_t inner) {
  constexpr int V = Width / 8;
  Vec8 acc[4][V] = {};
  for (int64_t k = 0; k < inner; ++k) {
    // (loaded as vectors: a memcpy into a Vec8 array went through the stack, four 16-byte stores and
    // a 32-byte load that could not be forwarded, the kernel's hottest instruction)
    Vec8 bk[V];
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) bk[v] = *reinterpret_cast<const UnalignedVec8*>(b + k * ldb + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const float a_rk = a[r * lda + k];
      const Vec8 x = {a_rk, a_rk, a_rk, a_rk, a_rk, a_rk, a_rk, a_rk};
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) acc[r][v] += x * bk[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      UnalignedVec8* out = reinterpret_cast<UnalignedVec8*>(c + r * ldc + 8 * v);
      *out = *out + acc[r][v];
    }
}

}  // namespace

LLMK_CPU_CLONES __attribute__((optimize("fp-contract=fast"))) void multiply_accumulate(
    const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc,
    int64_t rows, int64_t inner, int64_t cols, int64_t sum_chunk) {
  // Column blocks outermost (a block's columns of b, inner x 24 floats, stay in L1 over every row),
  // then rows, then the chunks of k (c's 4 x 24 block stays in L1 between them; k chunks outermost
  // streamed all of c through L2 once per chunk). Each output's chunks are added in k order.
  int64_t n = 0;
  for (; n + 24 <= cols; n += 24)
    for (int64_t r = 0; r < rows; r += 4)
      for (int64_t k = 0; k < inner; k += sum_chunk)
        multiply_block<24>(a + r * lda + k, lda, b + k * ldb + n, ldb, c + r * ldc + n, ldc, std::min(sum_chunk, inner - k));
  for (; n + 16 <= cols; n += 16)
    for (int64_t r = 0; r < rows; r += 4)
      for (int64_t k = 0; k < inner; k += sum_chunk)
        multiply_block<16>(a + r * lda + k, lda, b + k * ldb + n, ldb, c + r * ldc + n, ldc, std::min(sum_chunk, inner - k));
  for (; n < cols; n += 8)
    for (int64_t r = 0; r < rows; r += 4)
      for (int64_t k = 0; k < inner; k += sum_chunk)
        multiply_block<8>(a + r * lda + k, lda, b + k * ldb + n, ldb, c + r * ldc + n, ldc, std::min(sum_chunk, inner - k));
}

namespace {

// dst[r * kc + kk] = float(row r's elements [k0, k0 + kc)); row r is `first + r`, or rows[first + r].
template <typename T>
void load_rows(const T* base, int64_t ld, const int32_t* rows, int64_t first, int64_t count, int64_t k0,
               int64_t kc, float* __restrict dst) {
  for (int64_t r = 0; r < count; ++r) {
    const int64_t row = rows ? int64_t(rows[first + r]) : first + r;
    const T* __restrict src = base + row * ld + k0;
    float* __restrict d = dst + r * kc;
#pragma omp simd
    for (int64_t kk = 0; kk < kc; ++kk) d[kk] = to_float(src[kk]);
  }
}

// dst[kk * ld + c] = block[c][kk] for kk < kn: an 8 x 8 transpose in vector registers (unpack, shuffle,
// swap of 128-bit halves: 24 shuffles per 64 elements; the scalar one made the panel's load a fifth of
// the product's time).
typedef float Vec8 __attribute__((vector_size(32)));
typedef int IndexVec8 __attribute__((vector_size(32)));
LLMK_CPU_CLONES void store_transposed(const float (&block)[8][8], float* __restrict dst, int64_t ld, int64_t kn) {
  Vec8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], block[i], sizeof r[i]);
  const IndexVec8 low = {0, 8, 1, 9, 4, 12, 5, 13}, high = {2, 10, 3, 11, 6, 14, 7, 15};
  const IndexVec8 pairs_low = {0, 1, 8, 9, 4, 5, 12, 13}, pairs_high = {2, 3, 10, 11, 6, 7, 14, 15};
  const IndexVec8 halves_low = {0, 1, 2, 3, 8, 9, 10, 11}, halves_high = {4, 5, 6, 7, 12, 13, 14, 15};
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], low);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], high);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], pairs_low);
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], pairs_high);
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], pairs_low);
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], pairs_high);
  }
  Vec8 out[8];
  for (int i = 0; i < 4; ++i) {
    out[i] = __builtin_shuffle(u[i], u[i + 4], halves_low);
    out[i + 4] = __builtin_shuffle(u[i], u[i + 4], halves_high);
  }
  for (int kk = 0; kk < kn; ++kk) std::memcpy(dst + kk * ld, &out[kk], sizeof out[kk]);
}

// panel[kk * kBlockCols + c] = float(B's element (column j0 + c, k0 + kk)) for c < cols, zero for c in
// [cols, cols8): from B's rows (n, k) (8 x 8 blocks transposed through registers: the panel's rows are
// written whole), or k-major (k, n), whose rows are the panel's.
template <typename T>
void load_panel(const T* b, int64_t ldb, bool k_major, int64_t j0, int64_t cols, int64_t cols8, int64_t k0, int64_t kc,
                float* __restrict panel) {
  if (k_major) {
    for (int64_t kk = 0; kk < kc; ++kk) {
      const T* __restrict src = b + (k0 + kk) * ldb + j0;
      float* __restrict d = panel + kk * kBlockCols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) d[c] = to_float(src[c]);
      for (int64_t c = cols; c < cols8; ++c) d[c] = 0.0f;
    }
    return;
  }
  for (int64_t c0 = 0; c0 < cols8; c0 += 8)
    for (int64_t kk0 = 0; kk0 < kc; kk0 += 8) {
      float block[8][8];   // [column][k]
      const int64_t kn = std::min<int64_t>(8, kc - kk0);
      for (int c = 0; c < 8; ++c) {
        const T* __restrict src = b + (j0 + c0 + c) * ldb + k0 + kk0;
        if (c0 + c < cols && kn == 8) {
#pragma omp simd
          for (int kk = 0; kk < 8; ++kk) block[c][kk] = to_float(src[kk]);
        } else {
          for (int kk = 0; kk < 8; ++kk) block[c][kk] = c0 + c < cols && kk < kn ? to_float(src[kk]) : 0.0f;
        }
      }
      store_transposed(block, panel + kk0 * kBlockCols + c0, kBlockCols, kn);
    }
}

// One row of A against `cols` bf16 rows of B read in place (a bf16 is the top half of a float: one
// shift), for decode (M = 1): converting B into a float tile first moved every weight byte three
// times, and ran at 0.44x torch.matmul at 1 x 4096 x 4096 on a 2-core AVX2 EPYC.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void row_products_bf16(const float* __restrict a, const uint16_t* __restrict b, int64_t ldb, int64_t cols,
                       int64_t kc, float* __restrict acc) {
  for (int64_t c = 0; c < cols; ++c) {
    const uint16_t* __restrict row = b + c * ldb;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t kk = 0; kk < kc; ++kk) sum += a[kk] * bits_float(uint32_t(row[kk]) << 16);
    acc[c] += sum;
  }
}

// v = acc * row_scale[i] * col_scale[j] + bias[j], in fp32 (gemm.h's order).
inline float scaled(const Problem& p, float acc, int64_t i, int64_t j) {
  float v = acc;
  if (p.row_scale) v = v * p.row_scale[i];
  if (p.col_scale) v = v * p.col_scale[j];
  if (p.bias) v = v + p.bias[j];
  return v;
}

template <typename O>
inline void store(O* out, float v, bool accumulate) {
  *out = from_float<O>(accumulate ? to_float(*out) + v : v);
}

// The epilogue of columns [j0, j0 + cols) of row i; acc holds their sums.
template <typename O>
void epilogue_row(const Problem& p, int64_t i, int64_t j0, int64_t cols, const float* acc) {
  O* out_row = static_cast<O*>(p.out) + i * p.ldo;
  switch (p.activation) {
    case Activation::none:
      for (int64_t c = 0; c < cols; ++c) store(out_row + j0 + c, scaled(p, acc[c], i, j0 + c), p.accumulate);
      break;
    case Activation::silu:
      for (int64_t c = 0; c < cols; ++c) store(out_row + j0 + c, silu(scaled(p, acc[c], i, j0 + c)), p.accumulate);
      break;
    case Activation::gelu:
      for (int64_t c = 0; c < cols; ++c) store(out_row + j0 + c, gelu(scaled(p, acc[c], i, j0 + c)), p.accumulate);
      break;
    case Activation::swiglu:  // j0 and cols are even: (gate, up) = columns (j, j + 1), out column j / 2
      for (int64_t c = 0; c < cols; c += 2) {
        const float gate = scaled(p, acc[c], i, j0 + c);
        const float up = scaled(p, acc[c + 1], i, j0 + c + 1);
        store(out_row + (j0 + c) / 2, silu(gate) * up, p.accumulate);
      }
      break;
  }
}

template <typename T, typename O>
void gemm_typed(const Problem& p) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const int64_t row_blocks = (p.m + kBlockRows - 1) / kBlockRows;
  const int64_t col_blocks = (p.n + kBlockCols - 1) / kBlockCols;
  const int64_t tiles = row_blocks * col_blocks;
  if constexpr (std::is_same_v<T, bf16>) {
    if (p.m == 1) {  // decode: whole rows of B, read in place, one after another (prefetch-friendly)
      std::vector<float> a_row(size_t(p.k));
      load_rows(a, p.lda, p.a_rows, 0, 1, 0, p.k, a_row.data());
#pragma omp parallel
      {
        std::vector<float> acc(kBlockCols);
#pragma omp for schedule(static)
        for (int64_t j0 = 0; j0 < p.n; j0 += kBlockCols) {
          const int64_t cols = std::min(kBlockCols, p.n - j0);
          std::fill(acc.begin(), acc.end(), 0.0f);
          row_products_bf16(a_row.data(), reinterpret_cast<const uint16_t*>(b + j0 * p.ldb), p.ldb, cols, p.k,
                            acc.data());
          epilogue_row<O>(p, 0, j0, cols, acc.data());
        }
      }
      return;
    }
  }
#pragma omp parallel
  {
    std::vector<float> a_tile(kBlockRows * kBlockK), b_panel(kBlockK * kBlockCols), acc(kBlockRows * kBlockCols),
        slice(kBlockRows * kBlockCols);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tiles; ++t) {
      // Consecutive tiles share a row block (A's tile stays in cache; B streams).
      const int64_t i0 = (t / col_blocks) * kBlockRows, j0 = (t % col_blocks) * kBlockCols;
      const int64_t rows = std::min(kBlockRows, p.m - i0), cols = std::min(kBlockCols, p.n - j0);
      const int64_t rows4 = (rows + 3) / 4 * 4, cols8 = (cols + 7) / 8 * 8;   // (the block's multiples)
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k0 = 0; k0 < p.k; k0 += kBlockK) {
        const int64_t kc = std::min(kBlockK, p.k - k0);
        load_panel(b, p.ldb, p.b_k_major, j0, cols, cols8, k0, kc, b_panel.data());
        load_rows(a, p.lda, p.a_rows, i0, rows, k0, kc, a_tile.data());
        std::fill(a_tile.begin() + rows * kc, a_tile.begin() + rows4 * kc, 0.0f);
        // (each slice's sums start from zero and are added to the tile's once: shorter chains of
        // rounded additions, the fp32 error within PyTorch's at K = 4096)
        std::fill(slice.begin(), slice.begin() + rows4 * kBlockCols, 0.0f);
        multiply_accumulate(a_tile.data(), kc, b_panel.data(), kBlockCols, slice.data(), kBlockCols, rows4, kc, cols8,
                            kSumChunk);
        for (int64_t e = 0; e < rows4 * kBlockCols; ++e) acc[size_t(e)] += slice[size_t(e)];
      }
      for (int64_t r = 0; r < rows; ++r) epilogue_row<O>(p, i0 + r, j0, cols, &acc[r * kBlockCols]);
    }
  }
}

}  // namespace

void gemm_cpu(const Problem& problem) {
  dispatch<float, bf16, f16>(problem.dtype, "gemm (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // (decode reads B's rows in place: a k-major B ((k, n): out = A · B) is transposed into them first)
    Problem p = problem;
    std::vector<T> b_rows;
    if (p.b_k_major && p.m == 1 && std::is_same_v<T, bf16>) {
      b_rows.resize(size_t(p.n * p.k));
      const T* b = static_cast<const T*>(p.b);
#pragma omp parallel for schedule(static)
      for (int64_t j = 0; j < p.n; ++j)
        for (int64_t i = 0; i < p.k; ++i) b_rows[size_t(j * p.k + i)] = b[i * p.ldb + j];
      p.b = b_rows.data();
      p.ldb = p.k;
      p.b_k_major = false;
    }
    if (p.out_dtype == DType::f32) {
      gemm_typed<T, float>(p);
    } else {
      LLMK_CHECK(p.out_dtype == p.dtype, TypeError, "gemm: out must be ", dtype_name(p.dtype), " or float32; got ",
                 dtype_name(p.out_dtype));
      gemm_typed<T, T>(p);
    }
  });
}

}  // namespace llmk::gemm
