// CPU kernel of the GEMM core (gemm.h): out = epilogue(A · Bᵀ) with fp32 accumulation.
//
// OpenMP over output tiles of kBlockRows x kBlockCols. Per tile and slice of kBlockK columns of k,
// the tile's rows of A (gathered through a_rows when given) and of B are converted to float once,
// then every output element is a dot product over a contiguous float slice: eight of them at a
// time (2 rows x 4 columns), a vectorized reduction (`omp simd`) whose loads are shared. The
// epilogue runs in fp32 exactly as gemm.h writes it, and the result is rounded once (to nearest
// even) into out, or added to out's existing value and rounded once (accumulate).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/float_types.h"
#include "core/dispatch.h"
#include "gemm/gemm.h"

namespace llmk::gemm {
namespace {

constexpr int64_t kBlockRows = 32;
constexpr int64_t kBlockCols = 64;   // a multiple of 8: swiglu's (gate, up) pairs never straddle tiles
constexpr int64_t kBlockK = 256;

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

// acc_r[c] += dot(a_r, b_c) over kc elements, for R rows (1 or 2) and 4 columns: eight lanes of
// partial sums per output (AVX2), products rounded before they are added (no FMA: the build forbids
// contraction, and the baseline x86-64 target has none).
template <int R>
inline void dot_rx4(const float* __restrict a0, const float* __restrict a1, const float* __restrict b,
                    int64_t kc, float* __restrict acc0, float* __restrict acc1) {
  const float* __restrict b0 = b;
  const float* __restrict b1 = b + kc;
  const float* __restrict b2 = b + 2 * kc;
  const float* __restrict b3 = b + 3 * kc;
  float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  if constexpr (R == 2) {
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
    for (int64_t kk = 0; kk < kc; ++kk) {
      const float x0 = a0[kk], x1 = a1[kk];
      const float y0 = b0[kk], y1 = b1[kk], y2 = b2[kk], y3 = b3[kk];
      s00 += x0 * y0; s01 += x0 * y1;
      s02 += x0 * y2; s03 += x0 * y3;
      s10 += x1 * y0; s11 += x1 * y1;
      s12 += x1 * y2; s13 += x1 * y3;
    }
    acc1[0] += s10; acc1[1] += s11; acc1[2] += s12; acc1[3] += s13;
  } else {
    (void)a1; (void)acc1;
#pragma omp simd reduction(+ : s00, s01, s02, s03)
    for (int64_t kk = 0; kk < kc; ++kk) {
      const float x0 = a0[kk];
      s00 += x0 * b0[kk]; s01 += x0 * b1[kk];
      s02 += x0 * b2[kk]; s03 += x0 * b3[kk];
    }
  }
  acc0[0] += s00; acc0[1] += s01; acc0[2] += s02; acc0[3] += s03;
}

// acc[r * kBlockCols + c] += dot(A row r, B row c) over one slice of kc elements, for a tile of
// rows x cols (cols % 4 == 0). Compiled for AVX-512, AVX2 and baseline x86-64, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void tile_products(const float* a_tile, const float* b_tile, int64_t rows, int64_t cols, int64_t kc, float* acc) {
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2)
    for (int64_t c = 0; c < cols; c += 4)
      dot_rx4<2>(a_tile + r * kc, a_tile + (r + 1) * kc, b_tile + c * kc, kc, acc + r * kBlockCols + c,
                 acc + (r + 1) * kBlockCols + c);
  if (r < rows)
    for (int64_t c = 0; c < cols; c += 4)
      dot_rx4<1>(a_tile + r * kc, nullptr, b_tile + c * kc, kc, acc + r * kBlockCols + c, nullptr);
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
    std::vector<float> a_tile(kBlockRows * kBlockK), b_tile(kBlockCols * kBlockK), acc(kBlockRows * kBlockCols);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tiles; ++t) {
      // Consecutive tiles share a row block (A's tile stays in cache; B streams).
      const int64_t i0 = (t / col_blocks) * kBlockRows, j0 = (t % col_blocks) * kBlockCols;
      const int64_t rows = std::min(kBlockRows, p.m - i0), cols = std::min(kBlockCols, p.n - j0);  // cols % 8 == 0
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k0 = 0; k0 < p.k; k0 += kBlockK) {
        const int64_t kc = std::min(kBlockK, p.k - k0);
        load_rows(a, p.lda, p.a_rows, i0, rows, k0, kc, a_tile.data());
        load_rows(b, p.ldb, nullptr, j0, cols, k0, kc, b_tile.data());
        tile_products(a_tile.data(), b_tile.data(), rows, cols, kc, acc.data());
      }
      for (int64_t r = 0; r < rows; ++r) epilogue_row<O>(p, i0 + r, j0, cols, &acc[r * kBlockCols]);
    }
  }
}

}  // namespace

void gemm_cpu(const Problem& problem) {
  dispatch<float, bf16, f16>(problem.dtype, "gemm (CPU kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    // A k-major B ((k, n): out = A · B) is transposed once into the (n, k) rows the kernel reads.
    Problem p = problem;
    std::vector<T> b_rows;
    if (p.b_k_major) {
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
