// The CUDA attention kernels (attention.h, docs/attention.md): FlashAttention-2's forward and
// backward on mma.sync m16n8k16 tensor cores (sm_80+), in the device vocabulary of csrc/common/.
// Compiled by nvcc for the GPU and by the host compiler for the emulator (docs/emulator.md).
//
//   forward_kernel      one block per (64 queries, query head, sequence): Q in registers, K/V tiles
//                       streamed through a two-stage cp.async ring, S = Q Kᵀ and O += P V on tensor
//                       cores, the online softmax in fp32 registers with exp2; out and lse.
//   backward_dq_kernel  the forward's loop again for dq (deterministic: one block owns its rows)
//   backward_dkdv_kernel one block per (64 keys, kv head, sequence, head_dim half for 256): loops over
//                       the query tiles that see its keys and over the query heads of its GQA group;
//                       dv += Pᵀ dO, dk += dSᵀ Q, and with `atomic_dq` dq += dS K into a float32
//                       accumulator by atomics (FlashAttention-2's fast path), converted afterwards.
//   backward_prologue   delta_i = dout_i . out_i - dlse_i (and zeroes the dq accumulator)
//
// Head dims are padded to 32, 64, 128 or 256 (the template D): columns past head_dim are zero-filled
// by cp.async and never stored, so a head_dim of 40 runs D = 64 on zeros (exact, wasted work).
//
// A warp owns 16 rows of a tile (mma.h's m16). Its lane holds rows g = lane / 4 and g + 8 of each
// 16 x 8 accumulator (columns 2t, 2t + 1, t = lane % 4): row statistics (max, sum) are quad
// reductions, and a C fragment of P re-packed as bf16/f16 pairs is directly an A fragment of the
// next mma (no shared-memory round trip for P in the forward, for dS in dq).
#include "attention/attention.h"
#include "common/cp_async.h"
#include "common/float_types.h"
#include "common/launch.h"
#include "common/ldmatrix.h"
#include "common/mma.h"
#include "common/swizzle.h"
#include "common/vector_io.h"
#include "common/warp_reduce.h"
#include "core/dispatch.h"

namespace llmk::attention {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInfinity = __builtin_huge_valf();
constexpr float kMinNormal = 1.17549435e-38f;  // FLT_MIN
// The dynamic shared memory a block may opt into on every sm_80+ GPU: 99 KB on sm_86/89 (163 KB on
// the A100, 227 KB on the H100). dk/dv at D = 256 uses 98.25 KB of it.
constexpr int kSharedLimit = 99 * 1024;

// -- tiles ---------------------------------------------------------------------------------------------

// The forward's (and the dq pass's) tiles for padded head dim D: 64 queries (4 warps x 16) against
// key tiles of 64 (32 for D = 256, so that Q and two stages of K and V fit the 99 KB every sm_80+
// GPU grants a block: 96 KB at D = 256, 80 KB at D = 128). Q stays in registers for D <= 128 (32
// registers a thread at 128); at 256 it is re-read from shared memory with ldmatrix.
template <int D>
struct ForwardTiles {
  static constexpr int block_q = 64, block_k = D <= 128 ? 64 : 32;
  static constexpr int warps = 4, threads = 32 * warps;
  static constexpr int row_bytes = 2 * D;
  static constexpr int q_bytes = block_q * row_bytes, k_bytes = block_k * row_bytes;
  static constexpr int stage_bytes = 2 * k_bytes;  // K tile, then V tile
  static constexpr int shared_bytes = q_bytes + 2 * stage_bytes;
  static constexpr bool q_in_registers = D <= 128;
  static constexpr SwizzledTile layout() { return SwizzledTile{row_bytes}; }
  static_assert(shared_bytes <= kSharedLimit, "the forward's tiles must fit every sm_80+ GPU");
};

// Copies rows [0, Rows) of a (token, head_dim) slice into a swizzled tile of D columns with 16-byte
// cp.async copies; rows at or past `valid_rows` and columns at or past `head_dim` (a multiple of 8,
// so a chunk is wholly in or out) are zero-filled without reading.
template <typename T, int D, int Rows, int Threads>
LLMK_DEVICE void load_tile(uint8_t* tile, const T* rows, int64_t row_stride, int64_t valid_rows, int head_dim,
                          int thread) {
  constexpr int chunks_per_row = D / 8;
  constexpr SwizzledTile layout{2 * D};
  static_assert((Rows * chunks_per_row) % Threads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int c = thread; c < Rows * chunks_per_row; c += Threads) {
    const int r = c / chunks_per_row, chunk = c % chunks_per_row;
    const bool inside = r < valid_rows && 8 * chunk < head_dim;
    cp_async<16>(tile + layout.offset(r, 16 * chunk), inside ? rows + r * row_stride + 8 * chunk : rows,
                 inside ? 16 : 0);
  }
}

// ldmatrix addressing. A fragment's 16 x 16 block at rows row0.. (row0 a multiple of 8) and columns
// 16c.. of a swizzled tile is read at row0 * row_bytes + (lane_offset ^ 32c): the swizzle depends on
// the row only modulo 8 (swizzle.h), so the row part is a constant that ldmatrix takes as an
// immediate; and a lane's chunk is 2c + x (x = 0 or 1) XORed with a row function below 8, which is
// 2c ^ (x ^ row function): column step c flips bit 5 and up of the lane's c = 0 offset (checked for
// every row width on the CPU: tests/test_vocabulary.py). One register a thread per operand: the
// unrolled loops otherwise hoisted one address per (row block, column step) and spilled at D = 256.
struct LaneOffset {
  int base;
  LLMK_DEVICE int at(int c) const { return base ^ (32 * c); }
};

// For A = X (rows are m, columns are k) and for B of C = X Yᵀ (Y's rows are n, columns k):
// lanes 0-15 address rows 0-15 at columns 0-7, lanes 16-31 the same rows at columns 8-15 (A's order:
// mma.h); for B the matrices are (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
template <int D>
LLMK_DEVICE LaneOffset a_offset(int lane) {
  return LaneOffset{SwizzledTile{2 * D}.offset(lane % 16, 16 * (lane / 16))};
}
template <int D>
LLMK_DEVICE LaneOffset b_offset(int lane) {
  return LaneOffset{SwizzledTile{2 * D}.offset(8 * (lane / 16) + lane % 8, 16 * ((lane / 8) % 2))};
}
// For B of C = X Y with Y row-major (rows are k, columns n), by ldmatrix.trans: matrices (k 0-7,
// n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
template <int D>
LLMK_DEVICE LaneOffset b_transposed_offset(int lane) {
  return LaneOffset{SwizzledTile{2 * D}.offset(lane % 8 + 8 * ((lane / 8) % 2), 16 * (lane / 16))};
}

template <int D>
LLMK_DEVICE void load_a_fragment(uint32_t (&a)[4], const uint8_t* tile, LaneOffset offset, int row0, int c) {
  ldmatrix<4>(a, tile + row0 * (2 * D) + offset.at(c));
}

// Two B fragments (n8 tiles) from one ldmatrix.x4, plain or transposed.
template <int D, bool Transposed>
LLMK_DEVICE void load_b_fragments(uint32_t (&b0)[2], uint32_t (&b1)[2], const uint8_t* tile, LaneOffset offset,
                                  int row0, int c) {
  uint32_t r[4];
  if constexpr (Transposed) ldmatrix_trans<4>(r, tile + row0 * (2 * D) + offset.at(c));
  else ldmatrix<4>(r, tile + row0 * (2 * D) + offset.at(c));
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// The A fragment of k columns 16kk..16kk+15 from a C-fragment accumulator c[n8 tile][4] (the same
// 16 rows): C's (row g, cols 2t, 2t+1) of tiles 2kk and 2kk+1 are A's registers 0 and 2, row g + 8's
// are registers 1 and 3.
template <typename T, int N>
LLMK_DEVICE void a_fragment_from_c(uint32_t (&a)[4], const float (&c)[N][4], int kk) {
  a[0] = pack_pair<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_pair<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_pair<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_pair<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

template <int N>
LLMK_DEVICE void zero(float (&c)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[n][e] = 0.0f;
}

// The kernels' two products, a warp's 16 rows at a time.
//
// acc (16 x 8N) += X Yᵀ, X's rows given as A fragments by a(kk) for each 16 columns kk of D, Y's rows
// row0..row0 + 8N of a tile (S = Q Kᵀ, dP = dO Vᵀ, Sᵀ = K Qᵀ, dPᵀ = V dOᵀ).
template <typename T, int D, int N, typename AFragment>
LLMK_DEVICE void multiply_by_rows(float (&acc)[N][4], AFragment&& a_fragment, const uint8_t* y_tile, LaneOffset lane,
                                  int row0 = 0) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    a_fragment(a, kk);
#pragma unroll
    for (int n = 0; n < N; n += 2) {
      uint32_t b0[2], b1[2];
      load_b_fragments<D, false>(b0, b1, y_tile, lane, row0 + 8 * n, kk);
      mma_m16n8k16<T>(acc[n], a, b0, acc[n]);
      mma_m16n8k16<T>(acc[n + 1], a, b1, acc[n + 1]);
    }
  }
}

// acc (16 x 8N) += C Y, C (16 x 16K) an accumulator re-packed as A fragments (P, dS, Pᵀ, dSᵀ), Y's
// rows 0..16K of a tile from column 16 col_step0 on (O += P V, dq += dS K, dv += Pᵀ dO, dk += dSᵀ Q).
template <typename T, int D, int K, int N, int CN>
LLMK_DEVICE void multiply_c_by_tile(float (&acc)[N][4], const float (&c)[CN][4], const uint8_t* y_tile,
                                    LaneOffset transposed_lane, int col_step0 = 0) {
  static_assert(CN == 2 * K, "C has two n8 tiles per 16 of k");
#pragma unroll
  for (int kk = 0; kk < K; ++kk) {
    uint32_t a[4];
    a_fragment_from_c<T>(a, c, kk);
#pragma unroll
    for (int n = 0; n < N; n += 2) {
      uint32_t b0[2], b1[2];
      load_b_fragments<D, true>(b0, b1, y_tile, transposed_lane, 16 * kk, col_step0 + n / 2);
      mma_m16n8k16<T>(acc[n], a, b0, acc[n]);
      mma_m16n8k16<T>(acc[n + 1], a, b1, acc[n + 1]);
    }
  }
}

// Stores a thread's rows g and g + 8 (row_in_tile[0..1]) of acc (16 x 8N) as T: columns col0 + 8n +
// 2t, +1 of rows below `valid_rows`, columns below `head_dim`; `scale[r]` multiplies row r.
template <typename T, int N>
LLMK_DEVICE void store_rows(T* rows, int64_t row_stride, const float (&acc)[N][4], const int (&row_in_tile)[2],
                            int64_t valid_rows, int col0, int head_dim, int lane, const float (&scale)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row_in_tile[r] >= valid_rows) continue;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const int col = col0 + 8 * n + 2 * (lane % 4);
      if (col < head_dim)
        store_global(reinterpret_cast<uint32_t*>(rows + row_in_tile[r] * row_stride + col),
                     pack_pair<T>(acc[n][2 * r] * scale[r], acc[n][2 * r + 1] * scale[r]));
    }
  }
}

// -- problem geometry ------------------------------------------------------------------------------------

// Sequence b: its first query and key token in the packed tensors and its lengths.
struct Sequence { int64_t q_begin, k_begin, sq, sk; };

LLMK_DEVICE Sequence sequence_of(const Problem& p, int64_t b) {
  if (!p.cu_seqlens_q) return Sequence{0, 0, p.seqlen_q, p.seqlen_k};
  const int64_t q0 = load_global(p.cu_seqlens_q + b), q1 = load_global(p.cu_seqlens_q + b + 1);
  const int64_t k0 = load_global(p.cu_seqlens_k + b), k1 = load_global(p.cu_seqlens_k + b + 1);
  return Sequence{q0, k0, q1 - q0, k1 - k0};
}

// Row `token` of head `head` of sequence b (token counted from the packed tensor's start for varlen).
template <typename T>
LLMK_DEVICE T* token_row(T* base, const Layout& layout, int64_t b, int64_t token, int64_t head) {
  return base + b * layout.batch + token * layout.token + head * layout.head;
}

// score(i, j) in log2 units (times log2 e), for the element of query i and key j, from q.k: scale,
// softcap, ALiBi and the mask in flash-attn's order. `softcap_slope` returns dscore/d(q.k) too (the
// backward's chain rule), in natural units.
struct ScoreRule {
  float scale, scale_log2, softcap, slope;  // slope = 0 without ALiBi
  int diagonal_offset;                      // sk - sq: query i sits at key position i + offset

  LLMK_DEVICE float log2_score(float dot, int i, int j, float* dscore = nullptr) const {
    float s = dot * scale;
    if (softcap > 0.0f) {
      const float t = tanhf(s / softcap);
      s = softcap * t;
      if (dscore) *dscore = scale * ((1.0f - t) * (1.0f + t));  // 1 - t^2, accurate near saturation
    } else if (dscore) {
      *dscore = scale;
    }
    if (slope != 0.0f) {
      const int distance = i + diagonal_offset - j;
      s -= slope * float(distance < 0 ? -distance : distance);
    }
    return s * kLog2e;
  }
  LLMK_DEVICE bool plain() const { return softcap <= 0.0f && slope == 0.0f; }
  // The exact inverse of the factor that took scores to log2 units: scale_log2 / scale on the plain
  // path, kLog2e on the other (both rounded to fp32, so not quite log2 e). A scale of 0, or one so
  // small that scale * kLog2e is not a normal float, leaves every score about 0 and the ratio
  // undefined (0 / 0) or wrong: 1 / kLog2e then.
  LLMK_DEVICE double natural_per_log2() const {
    return plain() && fabsf(scale_log2) >= kMinNormal ? double(scale) / double(scale_log2) : 1.0 / double(kLog2e);
  }
};

LLMK_DEVICE ScoreRule score_rule(const Problem& p, int64_t b, int64_t h, const Sequence& seq) {
  const float slope = p.alibi_slopes ? load_global(p.alibi_slopes + b * p.alibi_batch_stride + h) : 0.0f;
  return ScoreRule{p.scale, p.scale * kLog2e, p.softcap, slope, int(seq.sk - seq.sq)};
}

// Whether query i may see key j (allowed_keys's range as a per-element test, in 32-bit arithmetic:
// attention.cpp keeps sequences below 2^30 tokens), false past either sequence's end.
struct SequenceMask {
  int sq, sk, offset;  // offset = sk - sq: query i sits at key position i + offset
  int left, right;     // window, -1 = unbounded; causal: right = 0
  LLMK_DEVICE bool allowed(int i, int j) const {
    const int distance = i + offset - j;  // > 0: the key is left of the query's position
    return i < sq && j < sk && (right < 0 || -distance <= right) && (left < 0 || distance <= left);
  }
};

LLMK_DEVICE SequenceMask sequence_mask(const Sequence& seq, const Mask& mask) {
  constexpr int64_t kUnbounded = int64_t(1) << 30;  // wider than any sequence: the same as -1
  auto window = [&](int64_t w) { return int(w < 0 || w > kUnbounded ? -1 : w); };
  return SequenceMask{int(seq.sq), int(seq.sk), int(seq.sk - seq.sq), window(mask.window_left),
                      mask.causal ? 0 : window(mask.window_right)};
}

// The key tiles a block of queries [q0, q_last] visits, and which of them need the per-element mask.
struct KeyTiles {
  int64_t first, end;          // tile indices [first, end)
  int64_t full_begin, full_end;  // keys that every query of the block may see: tiles inside need no mask
  LLMK_DEVICE bool needs_mask(int64_t tile, int block_k) const {
    return tile * block_k < full_begin || (tile + 1) * block_k > full_end;
  }
};

LLMK_DEVICE KeyTiles key_tiles(int64_t q0, int64_t q_last, const Sequence& seq, const Mask& mask, int block_k) {
  const KeyRange first = allowed_keys(q0, seq.sq, seq.sk, mask), last = allowed_keys(q_last, seq.sq, seq.sk, mask);
  // begin and end are monotone in the query (attention.h): the block's keys are [first.begin, last.end)
  KeyTiles t{first.begin / block_k, (last.end + block_k - 1) / block_k, last.begin, first.end};
  if (last.end <= first.begin) t.end = t.first;  // no query of the block sees a key
  return t;
}

// Key tile `tile` (rows tile * BK.. of sequence b's keys, kv head kv_head) of K and of V into two
// swizzled tiles: the forward's and the dq pass's ring stage.
template <typename T, int D, int BK, int Threads>
LLMK_DEVICE void load_key_value_tile(uint8_t* k_tile, uint8_t* v_tile, const Problem& p, const Sequence& seq,
                                     int64_t b, int64_t kv_head, int64_t tile, int thread) {
  const int64_t k0 = tile * BK, rows = seq.sk - k0;
  load_tile<T, D, BK, Threads>(k_tile, token_row(static_cast<const T*>(p.k), p.k_layout, b, seq.k_begin + k0, kv_head),
                               p.k_layout.token, rows, int(p.head_dim), thread);
  load_tile<T, D, BK, Threads>(v_tile, token_row(static_cast<const T*>(p.v), p.v_layout, b, seq.k_begin + k0, kv_head),
                               p.v_layout.token, rows, int(p.head_dim), thread);
}

// -- forward ---------------------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(ForwardTiles<D>::threads, 1) forward_kernel(const __grid_constant__ Problem p) {
  using Tiles = ForwardTiles<D>;
  constexpr int BQ = Tiles::block_q, BK = Tiles::block_k;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Sequence seq = sequence_of(p, b);
  // Query tiles in reverse launch order: under a causal mask the last tiles have the most keys, and
  // starting them first keeps the tail of the grid short.
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * BQ;
  if (q0 >= seq.sq) return;
  const int thread = int(threadIdx.x), lane = thread % 32, warp = thread / 32;
  const int64_t kv_head = h / (p.heads_q / p.heads_k);
  const int64_t valid_q = seq.sq - q0 < BQ ? seq.sq - q0 : BQ;
  const int head_dim = int(p.head_dim);

  uint8_t* shared = dynamic_shared_memory();
  uint8_t* q_tile = shared;
  auto k_tile = [&](int stage) { return shared + Tiles::q_bytes + stage * Tiles::stage_bytes; };
  auto v_tile = [&](int stage) { return k_tile(stage) + Tiles::k_bytes; };

  const T* q_rows = token_row(static_cast<const T*>(p.q), p.q_layout, b, seq.q_begin + q0, h);
  const KeyTiles tiles = key_tiles(q0, q0 + valid_q - 1, seq, p.mask, BK);
  const ScoreRule rule = score_rule(p, b, h, seq);

  auto load_kv = [&](int stage, int64_t tile) {
    load_key_value_tile<T, D, BK, Tiles::threads>(k_tile(stage), v_tile(stage), p, seq, b, kv_head, tile, thread);
  };
  load_tile<T, D, BQ, Tiles::threads>(q_tile, q_rows, p.q_layout.token, valid_q, head_dim, thread);
  if (tiles.first < tiles.end) load_kv(0, tiles.first);
  cp_async_commit();

  // This thread's two rows: g and g + 8 of the warp's 16.
  const int row_in_tile[2] = {16 * warp + lane / 4, 16 * warp + lane / 4 + 8};
  const SequenceMask mask = sequence_mask(seq, p.mask);

  float o[D / 8][4];
  zero(o);
  float row_max[2] = {-kInfinity, -kInfinity}, row_sum[2] = {0.0f, 0.0f};
  uint32_t q_fragments[Tiles::q_in_registers ? D / 16 : 1][4];

  const LaneOffset q_offset = a_offset<D>(lane), k_offset = b_offset<D>(lane), v_offset = b_transposed_offset<D>(lane);
  cp_async_wait<0>();
  __syncthreads();
  if constexpr (Tiles::q_in_registers) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a_fragment<D>(q_fragments[kk], q_tile, q_offset, 16 * warp, kk);
  }

  int stage = 0;
  for (int64_t tile = tiles.first; tile < tiles.end; ++tile) {
    // After this barrier tile `tile` has landed for everyone and every warp is done with the stage the
    // prefetch below overwrites (it held tile - 1).
    cp_async_wait<0>();
    __syncthreads();
    if (tile + 1 < tiles.end) load_kv(stage ^ 1, tile + 1);
    cp_async_commit();

    // S = Q Kᵀ: the warp's 16 queries x BK keys.
    float s[BK / 8][4];
    zero(s);
    multiply_by_rows<T, D>(s, [&](uint32_t (&a)[4], int kk) {
      if constexpr (Tiles::q_in_registers) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = q_fragments[kk][e];
      } else {
        load_a_fragment<D>(a, q_tile, q_offset, 16 * warp, kk);
      }
    }, k_tile(stage), k_offset);

    // Scores in log2 units; masks only on the tiles that straddle a row's key range (or the keys' end).
    const int64_t k0 = tile * BK;
    const bool masked = tiles.needs_mask(tile, BK);
    if (rule.plain() && !masked) {
#pragma unroll
      for (int n = 0; n < BK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] *= rule.scale_log2;
    } else {
#pragma unroll
      for (int n = 0; n < BK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = int(q0) + row_in_tile[e / 2], j = int(k0) + mma_c_coord(lane, e).col + 8 * n;
          // (the backward's formula for the same score, so that its P matches this lse to the bit)
          const float score = rule.plain() ? s[n][e] * rule.scale_log2 : rule.log2_score(s[n][e], i, j);
          s[n][e] = mask.allowed(i, j) ? score : -kInfinity;
        }
    }

    // Online softmax: new row maxima, rescale what was summed so far, P = exp2(S - max).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -kInfinity;
#pragma unroll
      for (int n = 0; n < BK / 8; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      const float new_max = fmaxf(row_max[r], quad_max(tile_max));
      // A row with no allowed key so far keeps max -inf: subtract 0 instead (exp2(-inf) = 0, no NaN).
      const float base = new_max == -kInfinity ? 0.0f : new_max;
      const float correction = exp2f(row_max[r] - base);
      row_max[r] = new_max;
      row_sum[r] *= correction;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * r] *= correction;
        o[n][2 * r + 1] *= correction;
      }
#pragma unroll
      for (int n = 0; n < BK / 8; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] - base);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
        row_sum[r] += s[n][2 * r] + s[n][2 * r + 1];  // this thread's part; summed over the quad at the end
      }
    }

    // O += P V, P re-packed from S's registers as the A operand.
    multiply_c_by_tile<T, D, BK / 16>(o, s, v_tile(stage), v_offset);
    stage ^= 1;
  }

  // out = O / l and lse = (max + log2 l) ln 2; a row with no allowed key: out = 0, lse = +inf. The lse,
  // once a row, in double: fp32 here rounds three more times than torch's logsumexp (the add, the
  // change of base, log2) and measured 2.4x its error on an H200 (bench/results/2026-11-26-h200.md).
  float inverse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    inverse[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    if (p.lse && lane % 4 == 0 && row_in_tile[r] < valid_q)
      store_global(p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_begin + q0 + row_in_tile[r],
                   sum > 0.0f ? float((double(row_max[r]) + log2(double(sum))) * rule.natural_per_log2()) : kInfinity);
  }
  store_rows(token_row(static_cast<T*>(p.out), p.out_layout, b, seq.q_begin + q0, h), p.out_layout.token, o,
             row_in_tile, valid_q, 0, head_dim, lane, inverse);
}

// -- backward ----------------------------------------------------------------------------------------

// delta_i = dout_i . out_i - dlse_i for every (sequence, token, query head) row, one warp a row, into
// lse's layout.
constexpr int kPrologueThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kPrologueThreads) backward_prologue_kernel(const __grid_constant__ Problem p,
                                                                             const __grid_constant__ Gradients g,
                                                                             int64_t batches, int64_t tokens) {
  const int64_t row = int64_t(blockIdx.x) * (kPrologueThreads / 32) + threadIdx.x / 32;
  const int lane = int(threadIdx.x % 32);
  if (row >= batches * tokens * p.heads_q) return;  // whole warps
  const int64_t b = row / (tokens * p.heads_q), token = row / p.heads_q % tokens, h = row % p.heads_q;
  const T* dout = token_row(static_cast<const T*>(g.dout), g.dout_layout, b, token, h);
  const T* out = token_row(static_cast<const T*>(g.out_values), g.out_layout, b, token, h);
  float sum = 0.0f;
  for (int c = lane; 8 * c < p.head_dim; c += 32) {
    const Vec<T, 8> x = load_global(reinterpret_cast<const Vec<T, 8>*>(dout) + c);
    const Vec<T, 8> y = load_global(reinterpret_cast<const Vec<T, 8>*>(out) + c);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += to_float(x[e]) * to_float(y[e]);
  }
  sum = warp_sum(sum);
  const int64_t index = b * p.lse_batch_stride + h * p.lse_head_stride + token;
  if (lane == 0) store_global(g.delta + index, sum - (g.dlse ? load_global(g.dlse + index) : 0.0f));
}

// dq = dq_accum in T (the atomic path's last step), 8 elements a thread.
template <typename T>
__global__ void __launch_bounds__(kPrologueThreads) convert_dq_kernel(const __grid_constant__ Problem p,
                                                                      const __grid_constant__ Gradients g,
                                                                      int64_t batches, int64_t tokens) {
  const int64_t chunks_per_row = p.head_dim / 8;
  const int64_t chunk = int64_t(blockIdx.x) * kPrologueThreads + threadIdx.x;
  if (chunk >= batches * tokens * p.heads_q * chunks_per_row) return;
  const int64_t row = chunk / chunks_per_row, c = chunk % chunks_per_row;
  const int64_t b = row / (tokens * p.heads_q), token = row / p.heads_q % tokens, h = row % p.heads_q;
  const float* accum = token_row(static_cast<const float*>(g.dq_accum), g.dq_accum_layout, b, token, h) + 8 * c;
  const Vec<float, 4> lo = load_global(reinterpret_cast<const Vec<float, 4>*>(accum));
  const Vec<float, 4> hi = load_global(reinterpret_cast<const Vec<float, 4>*>(accum) + 1);
  Vec<T, 8> v;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    v[e] = from_float<T>(lo[e]);
    v[e + 4] = from_float<T>(hi[e]);
  }
  store_global(reinterpret_cast<Vec<T, 8>*>(token_row(static_cast<T*>(g.dq), g.dq_layout, b, token, h)) + c, v);
}

// The dq pass (deterministic): the forward's loop over key tiles, for 64 queries of one head,
//   S = Q Kᵀ, P = exp2(S - lse), dP = dO Vᵀ, dS = P (dP - delta) dscore, dq += dS K.
// Q and dO stay in shared memory (ldmatrix each use); key tiles of 64 (16 at D = 256: 96 KB in all).
template <int D>
struct DqTiles {
  static constexpr int block_q = 64, block_k = D <= 128 ? 64 : 16;
  static constexpr int warps = 4, threads = 32 * warps;
  static constexpr int row_bytes = 2 * D;
  static constexpr int q_bytes = block_q * row_bytes, k_bytes = block_k * row_bytes;
  static constexpr int stage_bytes = 2 * k_bytes;
  static constexpr int shared_bytes = 2 * q_bytes + 2 * stage_bytes;
  static_assert(shared_bytes <= kSharedLimit, "the dq pass's tiles must fit every sm_80+ GPU");
};

template <typename T, int D>
__global__ void __launch_bounds__(DqTiles<D>::threads, 1) backward_dq_kernel(const __grid_constant__ Problem p,
                                                                            const __grid_constant__ Gradients g) {
  using Tiles = DqTiles<D>;
  constexpr int BQ = Tiles::block_q, BK = Tiles::block_k;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const Sequence seq = sequence_of(p, b);
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * BQ;
  if (q0 >= seq.sq) return;
  const int thread = int(threadIdx.x), lane = thread % 32, warp = thread / 32;
  const int64_t kv_head = h / (p.heads_q / p.heads_k);
  const int64_t valid_q = seq.sq - q0 < BQ ? seq.sq - q0 : BQ;
  const int head_dim = int(p.head_dim);

  uint8_t* shared = dynamic_shared_memory();
  uint8_t* q_tile = shared;
  uint8_t* dout_tile = shared + Tiles::q_bytes;
  auto k_tile = [&](int stage) { return shared + 2 * Tiles::q_bytes + stage * Tiles::stage_bytes; };
  auto v_tile = [&](int stage) { return k_tile(stage) + Tiles::k_bytes; };

  const KeyTiles tiles = key_tiles(q0, q0 + valid_q - 1, seq, p.mask, BK);
  const ScoreRule rule = score_rule(p, b, h, seq);
  auto load_kv = [&](int stage, int64_t tile) {
    load_key_value_tile<T, D, BK, Tiles::threads>(k_tile(stage), v_tile(stage), p, seq, b, kv_head, tile, thread);
  };
  load_tile<T, D, BQ, Tiles::threads>(q_tile, token_row(static_cast<const T*>(p.q), p.q_layout, b, seq.q_begin + q0, h),
                                      p.q_layout.token, valid_q, head_dim, thread);
  load_tile<T, D, BQ, Tiles::threads>(
      dout_tile, token_row(static_cast<const T*>(g.dout), g.dout_layout, b, seq.q_begin + q0, h),
      g.dout_layout.token, valid_q, head_dim, thread);
  if (tiles.first < tiles.end) load_kv(0, tiles.first);
  cp_async_commit();

  const int row_in_tile[2] = {16 * warp + lane / 4, 16 * warp + lane / 4 + 8};
  const SequenceMask mask = sequence_mask(seq, p.mask);
  float lse_log2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t index = b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_begin + q0 + row_in_tile[r];
    const bool valid = row_in_tile[r] < valid_q;
    lse_log2[r] = valid ? load_global(p.lse + index) * kLog2e : kInfinity;  // +inf: P = 0
    delta[r] = valid ? load_global(g.delta + index) : 0.0f;
  }
  const LaneOffset a_lane = a_offset<D>(lane), b_lane = b_offset<D>(lane), bt_lane = b_transposed_offset<D>(lane);

  float dq[D / 8][4];
  zero(dq);
  int stage = 0;
  for (int64_t tile = tiles.first; tile < tiles.end; ++tile) {
    cp_async_wait<0>();
    __syncthreads();
    if (tile + 1 < tiles.end) load_kv(stage ^ 1, tile + 1);
    cp_async_commit();

    float s[BK / 8][4], dp[BK / 8][4];
    zero(s);
    zero(dp);
    multiply_by_rows<T, D>(s, [&](uint32_t (&a)[4], int kk) { load_a_fragment<D>(a, q_tile, a_lane, 16 * warp, kk); },
                           k_tile(stage), b_lane);
    multiply_by_rows<T, D>(dp, [&](uint32_t (&a)[4], int kk) { load_a_fragment<D>(a, dout_tile, a_lane, 16 * warp, kk); },
                           v_tile(stage), b_lane);
    // dS = P (dP - delta) dscore/d(q.k), in s's registers.
    const int64_t k0 = tile * BK;
    const bool masked = tiles.needs_mask(tile, BK);
#pragma unroll
    for (int n = 0; n < BK / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const int i = int(q0) + row_in_tile[r], j = int(k0) + mma_c_coord(lane, e).col + 8 * n;
        float dscore = rule.scale, score;
        if (rule.plain()) score = s[n][e] * rule.scale_log2;
        else score = rule.log2_score(s[n][e], i, j, &dscore);
        const bool allowed = !masked || mask.allowed(i, j);
        const float prob = allowed ? exp2f(score - lse_log2[r]) : 0.0f;
        s[n][e] = prob * (dp[n][e] - delta[r]) * dscore;
      }
    multiply_c_by_tile<T, D, BK / 16>(dq, s, k_tile(stage), bt_lane);  // dq += dS K
    stage ^= 1;
  }
  cp_async_wait<0>();  // no copy in flight when the block exits (with no key tile, the loop never waited)
  store_rows(token_row(static_cast<T*>(g.dq), g.dq_layout, b, seq.q_begin + q0, h), g.dq_layout.token, dq,
             row_in_tile, valid_q, 0, head_dim, lane, {1.0f, 1.0f});
}

// The dk/dv pass: one block per (64 keys, kv head, sequence, column half at D = 256). It loops over
// the query heads of its GQA group and, for each, over the query tiles that see its keys (tiles of 32,
// 16 from D = 128), with Q, dO, lse and delta streamed through a two-stage cp.async ring:
//   Sᵀ = K Qᵀ, Pᵀ = exp2(Sᵀ - lse), dv += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ (dPᵀ - delta) dscore, dk += dSᵀ Q,
// a warp owning 16 keys (its rows of Sᵀ), so dk and dv are sums inside the block (deterministic).
// With a dq accumulator, dSᵀ goes through shared memory and dq += dS K is added with float atomics.
// dk and dv accumulate `d_acc` <= 128 columns (two blocks split D = 256, each recomputing S and dP):
// 2 x 64 registers of accumulators a thread.
// (Query tiles of 16 from D = 128: with 32, the atomic dq step's live registers on top of dk and dv
// spilled 44-48 bytes at D = 128 on sm_80 and sm_90a.)
template <int D>
struct DkdvTiles {
  static constexpr int block_k = 64, block_q = D <= 64 ? 32 : 16;
  static constexpr int warps = 4, threads = 32 * warps;
  static constexpr int d_acc = D <= 128 ? D : 128, splits = D / d_acc;
  static constexpr int row_bytes = 2 * D;
  static constexpr int k_bytes = block_k * row_bytes, q_bytes = block_q * row_bytes;
  static constexpr int vector_bytes = 4 * block_q;                          // lse or delta of a tile
  static constexpr int stage_bytes = 2 * q_bytes + 2 * vector_bytes;        // Q, dO, lse, delta
  static constexpr int ds_row_bytes = 2 * block_q;                          // dSᵀ: keys x queries
  static constexpr int ds_bytes = block_k * ds_row_bytes;
  static constexpr int shared_bytes = 2 * k_bytes + 2 * stage_bytes + ds_bytes;
  // dq = dS K: (block_q / 16) row blocks of 16 queries, the warps of a row block splitting d_acc.
  static constexpr int dq_warps_per_rows = warps / (block_q / 16);
  static constexpr int dq_cols = d_acc / dq_warps_per_rows;
  static_assert(shared_bytes <= kSharedLimit, "the dk/dv pass's tiles must fit every sm_80+ GPU");
};

template <typename T, int D>
__global__ void __launch_bounds__(DkdvTiles<D>::threads, 1) backward_dkdv_kernel(const __grid_constant__ Problem p,
                                                                                const __grid_constant__ Gradients g) {
  using Tiles = DkdvTiles<D>;
  constexpr int BQ = Tiles::block_q, BK = Tiles::block_k, DA = Tiles::d_acc;
  const int64_t b = blockIdx.z, kv_head = blockIdx.y;
  const int64_t key_tile = blockIdx.x / Tiles::splits;
  const int col0 = int(blockIdx.x % Tiles::splits) * DA;  // this block's dk/dv/dq columns
  const Sequence seq = sequence_of(p, b);
  const int64_t k0 = key_tile * BK;
  if (k0 >= seq.sk) return;
  const int thread = int(threadIdx.x), lane = thread % 32, warp = thread / 32;
  const int64_t group = p.heads_q / p.heads_k;
  const int64_t valid_k = seq.sk - k0 < BK ? seq.sk - k0 : BK;
  const int head_dim = int(p.head_dim);

  uint8_t* shared = dynamic_shared_memory();
  uint8_t* k_tile = shared;
  uint8_t* v_tile = shared + Tiles::k_bytes;
  auto q_tile = [&](int stage) { return shared + 2 * Tiles::k_bytes + stage * Tiles::stage_bytes; };
  auto dout_tile = [&](int stage) { return q_tile(stage) + Tiles::q_bytes; };
  auto lse_of = [&](int stage) { return reinterpret_cast<float*>(q_tile(stage) + 2 * Tiles::q_bytes); };
  auto delta_of = [&](int stage) { return lse_of(stage) + BQ; };
  uint8_t* ds_tile = shared + 2 * Tiles::k_bytes + 2 * Tiles::stage_bytes;
  constexpr SwizzledTile ds_layout{Tiles::ds_row_bytes};

  // The queries (of any head of the group: the mask does not depend on the head) that see these keys.
  const KeyRange queries = queries_seeing(k0, k0 + valid_k, seq.sq, seq.sk, p.mask);
  const int64_t q_tiles = (queries.end - queries.begin + BQ - 1) / BQ;
  const int64_t steps = group * q_tiles;  // (head, query tile) pairs

  auto load_step = [&](int stage, int64_t step) {
    const int64_t h = kv_head * group + step / q_tiles, q0 = queries.begin + (step % q_tiles) * BQ;
    const int64_t rows = seq.sq - q0;
    load_tile<T, D, BQ, Tiles::threads>(q_tile(stage),
                                        token_row(static_cast<const T*>(p.q), p.q_layout, b, seq.q_begin + q0, h),
                                        p.q_layout.token, rows, head_dim, thread);
    load_tile<T, D, BQ, Tiles::threads>(
        dout_tile(stage), token_row(static_cast<const T*>(g.dout), g.dout_layout, b, seq.q_begin + q0, h),
        g.dout_layout.token, rows, head_dim, thread);
    if (thread < 2 * BQ) {  // lse and delta: one float a thread, zeros past the sequence (masked below)
      const int r = thread % BQ;
      const float* vector = thread < BQ ? p.lse : g.delta;
      const int64_t index = b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_begin + q0 + r;
      cp_async<4>((thread < BQ ? lse_of(stage) : delta_of(stage)) + r, r < rows ? vector + index : vector,
                  r < rows ? 4 : 0);
    }
  };
  const T* k_rows = token_row(static_cast<const T*>(p.k), p.k_layout, b, seq.k_begin + k0, kv_head);
  const T* v_rows = token_row(static_cast<const T*>(p.v), p.v_layout, b, seq.k_begin + k0, kv_head);
  load_tile<T, D, BK, Tiles::threads>(k_tile, k_rows, p.k_layout.token, valid_k, head_dim, thread);
  load_tile<T, D, BK, Tiles::threads>(v_tile, v_rows, p.v_layout.token, valid_k, head_dim, thread);
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  const LaneOffset a_lane = a_offset<D>(lane), b_lane = b_offset<D>(lane), bt_lane = b_transposed_offset<D>(lane);
  const int key_in_tile[2] = {16 * warp + lane / 4, 16 * warp + lane / 4 + 8};
  const SequenceMask mask = sequence_mask(seq, p.mask);
  float dk[DA / 8][4], dv[DA / 8][4];
  zero(dk);
  zero(dv);

  int stage = 0;
  for (int64_t step = 0; step < steps; ++step) {
    cp_async_wait<0>();
    __syncthreads();
    if (step + 1 < steps) load_step(stage ^ 1, step + 1);
    cp_async_commit();
    const int64_t h = kv_head * group + step / q_tiles, q0 = queries.begin + (step % q_tiles) * BQ;
    const ScoreRule rule = score_rule(p, b, h, seq);

    // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: the warp's 16 keys x BQ queries.
    float s[BQ / 8][4], dp[BQ / 8][4];
    zero(s);
    zero(dp);
    multiply_by_rows<T, D>(s, [&](uint32_t (&a)[4], int kk) { load_a_fragment<D>(a, k_tile, a_lane, 16 * warp, kk); },
                           q_tile(stage), b_lane);
    multiply_by_rows<T, D>(dp, [&](uint32_t (&a)[4], int kk) { load_a_fragment<D>(a, v_tile, a_lane, 16 * warp, kk); },
                           dout_tile(stage), b_lane);

    // Pᵀ (in s) and dSᵀ (in dp). Masks on the tiles where some (query, key) pair is not allowed: a key
    // past the sequence, a query past it, or a pair outside the query's key range.
    const int64_t q_last = q0 + BQ - 1;
    const bool masked = k0 + BK > seq.sk || q_last >= seq.sq ||
                        allowed_keys(q_last, seq.sq, seq.sk, p.mask).begin > k0 ||
                        allowed_keys(q0, seq.sq, seq.sk, p.mask).end < k0 + BK;
#pragma unroll
    for (int n = 0; n < BQ / 8; ++n) {
      const int col = 8 * n + 2 * (lane % 4);
      const Vec<float, 2> lse = load_shared(reinterpret_cast<const Vec<float, 2>*>(lse_of(stage) + col));
      const Vec<float, 2> delta = load_shared(reinterpret_cast<const Vec<float, 2>*>(delta_of(stage) + col));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = int(q0) + col + e % 2, j = int(k0) + key_in_tile[e / 2];
        float dscore = rule.scale, score;
        if (rule.plain()) score = s[n][e] * rule.scale_log2;
        else score = rule.log2_score(s[n][e], i, j, &dscore);
        const bool allowed = !masked || mask.allowed(i, j);
        const float prob = allowed ? exp2f(score - lse[e % 2] * kLog2e) : 0.0f;
        s[n][e] = prob;
        dp[n][e] = prob * (dp[n][e] - delta[e % 2]) * dscore;
      }
    }

    // dv += Pᵀ dO and dk += dSᵀ Q over this block's columns.
    multiply_c_by_tile<T, D, BQ / 16>(dv, s, dout_tile(stage), bt_lane, col0 / 16);
    multiply_c_by_tile<T, D, BQ / 16>(dk, dp, q_tile(stage), bt_lane, col0 / 16);

    if (g.dq_accum) {
      // dSᵀ to shared memory (keys x queries), then dq (queries x columns) += dS K with atomics.
#pragma unroll
      for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          store_shared(reinterpret_cast<uint32_t*>(ds_tile + ds_layout.offset(key_in_tile[r], 2 * (8 * n + 2 * (lane % 4)))),
                       pack_pair<T>(dp[n][2 * r], dp[n][2 * r + 1]));
      __syncthreads();
      const int query_block = warp / Tiles::dq_warps_per_rows;                      // 16 queries
      const int dq_col0 = col0 + (warp % Tiles::dq_warps_per_rows) * Tiles::dq_cols;  // of D
      float* dq_rows = token_row(g.dq_accum, g.dq_accum_layout, b, seq.q_begin + q0 + 16 * query_block, h);
      // A = dS (queries x keys) from dSᵀ by ldmatrix.trans: matrices (q 0-7, k 0-7), (q 8-15, k 0-7),
      // (q 0-7, k 8-15), (q 8-15, k 8-15) are the stored (keys, queries) blocks transposed.
      const int ds_row = lane % 8 + 8 * (lane / 16), ds_col = 16 * query_block + 8 * ((lane / 8) % 2);
      // (Not unrolled: unrolled, the four column steps' addresses and atomics spilled 48 bytes at D = 128.)
#pragma unroll 1
      for (int c = 0; c < Tiles::dq_cols; c += 16) {
        float acc[2][4];
        zero(acc);
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          uint32_t a[4], b0[2], b1[2];
          ldmatrix_trans<4>(a, ds_tile + ds_layout.offset(16 * kk + ds_row, 2 * ds_col));
          load_b_fragments<D, true>(b0, b1, k_tile, bt_lane, 16 * kk, (dq_col0 + c) / 16);
          mma_m16n8k16<T>(acc[0], a, b0, acc[0]);
          mma_m16n8k16<T>(acc[1], a, b1, acc[1]);
        }
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const FragmentCoord at = mma_c_coord(lane, e);
            const int col = dq_col0 + c + 8 * n + at.col;
            if (q0 + 16 * query_block + at.row < seq.sq && col < head_dim)
              atomicAdd(dq_rows + at.row * g.dq_accum_layout.token + col, acc[n][e]);
          }
      }
    }
    stage ^= 1;
  }
  cp_async_wait<0>();  // no copy in flight when the block exits (with no query tile, the loop never waited)

  // dk and dv of this block's keys and columns (zeros for keys no query sees).
  store_rows(token_row(static_cast<T*>(g.dk), g.dk_layout, b, seq.k_begin + k0, kv_head), g.dk_layout.token, dk,
             key_in_tile, valid_k, col0, head_dim, lane, {1.0f, 1.0f});
  store_rows(token_row(static_cast<T*>(g.dv), g.dv_layout, b, seq.k_begin + k0, kv_head), g.dv_layout.token, dv,
             key_in_tile, valid_k, col0, head_dim, lane, {1.0f, 1.0f});
}

// gridDim.y and gridDim.z are limited to 65535: heads and batch go there.
void check_grid(const Problem& p) {
  LLMK_CHECK(p.batch <= 65535 && p.heads_q <= 65535, ValueError, "attention (CUDA kernel): batch (", p.batch,
             ") and heads (", p.heads_q, ") must be at most 65535");
}

template <typename T, int D>
void run_backward(const Problem& p, const Gradients& g, DeviceStream stream) {
  check_grid(p);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t batches = varlen ? 1 : p.batch;
  const int64_t tokens = varlen ? p.lse_head_stride : p.seqlen_q;  // total_q for varlen
  const int64_t rows = batches * tokens * p.heads_q;
  launch("attention backward prologue", backward_prologue_kernel<T>,
         LaunchShape{dim3(uint32_t((rows + kPrologueThreads / 32 - 1) / (kPrologueThreads / 32))),
                     dim3(kPrologueThreads)},
         stream, p, g, batches, tokens);
  using Dkdv = DkdvTiles<D>;
  const int64_t key_tiles = (p.seqlen_k + Dkdv::block_k - 1) / Dkdv::block_k;
  launch("attention backward dk dv", backward_dkdv_kernel<T, D>,
         LaunchShape{dim3(uint32_t(key_tiles * Dkdv::splits), uint32_t(p.heads_k), uint32_t(p.batch)),
                     dim3(Dkdv::threads), Dkdv::shared_bytes},
         stream, p, g);
  if (g.dq_accum) {
    const int64_t chunks = rows * (p.head_dim / 8);
    launch("attention backward dq convert", convert_dq_kernel<T>,
           LaunchShape{dim3(uint32_t((chunks + kPrologueThreads - 1) / kPrologueThreads)), dim3(kPrologueThreads)},
           stream, p, g, batches, tokens);
  } else {
    using Dq = DqTiles<D>;
    const int64_t q_tiles = (p.seqlen_q + Dq::block_q - 1) / Dq::block_q;
    launch("attention backward dq", backward_dq_kernel<T, D>,
           LaunchShape{dim3(uint32_t(q_tiles), uint32_t(p.heads_q), uint32_t(p.batch)), dim3(Dq::threads),
                       Dq::shared_bytes},
           stream, p, g);
  }
}

template <typename T, int D>
void run_forward(const Problem& p, DeviceStream stream) {
  using Tiles = ForwardTiles<D>;
  const int64_t q_tiles = (p.seqlen_q + Tiles::block_q - 1) / Tiles::block_q;
  check_grid(p);
  launch("attention forward", forward_kernel<T, D>,
         LaunchShape{dim3(uint32_t(q_tiles), uint32_t(p.heads_q), uint32_t(p.batch)), dim3(Tiles::threads),
                     Tiles::shared_bytes},
         stream, p);
}

// The padded head dim: 32, 64, 128 or 256.
template <typename Fn>
void dispatch_head_dim(int64_t head_dim, Fn&& fn) {
  if (head_dim <= 32) fn(std::integral_constant<int, 32>{});
  else if (head_dim <= 64) fn(std::integral_constant<int, 64>{});
  else if (head_dim <= 128) fn(std::integral_constant<int, 128>{});
  else fn(std::integral_constant<int, 256>{});
}

}  // namespace

void backward_device(const Problem& problem, const Gradients& gradients, DeviceStream stream) {
  if (problem.batch == 0) return;
  dispatch<bf16, f16>(problem.dtype, "attention backward (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(problem.head_dim,
                      [&](auto d) { run_backward<T, decltype(d)::value>(problem, gradients, stream); });
  });
}

void forward_device(const Problem& problem, DeviceStream stream) {
  if (problem.batch == 0 || problem.seqlen_q == 0) return;
  dispatch<bf16, f16>(problem.dtype, "attention (CUDA kernel)", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_head_dim(problem.head_dim, [&](auto d) { run_forward<T, decltype(d)::value>(problem, stream); });
  });
}

}  // namespace llmk::attention
