// Mixture-of-Experts (docs/moe.md): the router, the block-sparse permutation, the grouped GEMMs of the
// experts' FFN and their weight gradients; one kernel (or a short chain) each, no host synchronization.
//
// route: per token t, over the E router logits l[t, :] in float32,
//   scores   softmax(l) (or sigmoid(l) elementwise)
//   top-k    the k largest logits, which are the k largest scores (both maps are increasing), in
//            descending order; equal logits: the lower expert index first (torch.topk's order on the
//            CPU). Selecting on the logits makes the choice independent of how the scores round.
//   weights  the selected scores, divided by their sum when `renormalize`
//   stats    tokens_per_expert[e] += 1 for every selection, logsumexp[t] = log sum exp l[t, :]
#pragma once
#include <cstdint>

#include "core/backend.h"
#include "core/tensor.h"
#include "gemm/gemm.h"

namespace llmk::moe {

enum class Scoring : int { softmax = 0, sigmoid = 1 };

// logits (T, E) fp32/bf16/fp16 with a contiguous last dimension; weights float32 (T, k), expert_ids
// int32 (T, k), tokens_per_expert int32 (E,) (overwritten), logsumexp float32 (T,); 1 <= k <= E <= 1024.
void route(const TensorView& logits, int64_t top_k, bool renormalize, Scoring scoring, const TensorView& weights,
           const TensorView& expert_ids, const TensorView& tokens_per_expert, const TensorView& logsumexp,
           void* stream);

constexpr int64_t kMaxExperts = 1024;

struct RouteProblem {
  DType dtype = DType::f32;
  int64_t tokens = 0, experts = 0, top_k = 0, ld = 0;
  bool renormalize = true;
  Scoring scoring = Scoring::softmax;
  const void* logits = nullptr;
  float* weights = nullptr;
  int32_t* expert_ids = nullptr;
  int32_t* tokens_per_expert = nullptr;
  float* logsumexp = nullptr;
};

void route_cpu(const RouteProblem& problem);
void route_device(const RouteProblem& problem, CudaStream stream);
void route_device(const RouteProblem& problem, EmuStream stream);

// permute: the block-sparse layout of a routing (llmkernels.reference.moe.permutation, worst_case):
// the (token, slot) pairs p = t k + s sorted by expert (stable: ascending p within an expert), each
// expert's rows padded to a multiple of `block`, in buffers of the worst-case size R = T k + E (block
// - 1) rows, so nothing waits for the counts on the host. expert_ids int32 (T, k), each in [0, E)
// (checked here for host memory; on a GPU the Python layer asserts it asynchronously) ->
//   expert_offsets int32 (E + 1,)  row_token, row_slot int32 (R,) (-1 on padding rows)
//   block_expert int32 (ceil(R / block),) (-1 past the last expert)   slot_row int32 (T, k)
// workspace int32, at least permute_workspace(T, k, E) elements (the CUDA kernels' per-chunk counts).
void permute(const TensorView& expert_ids, int64_t experts, int64_t block, const TensorView& expert_offsets,
             const TensorView& row_token, const TensorView& row_slot, const TensorView& block_expert,
             const TensorView& slot_row, const TensorView& workspace, void* stream);

constexpr int64_t kPermuteChunk = 256;   // pairs a CUDA block counts and places
inline int64_t permute_rows(int64_t tokens, int64_t top_k, int64_t experts, int64_t block) {
  return tokens * top_k + experts * (block - 1);
}
inline int64_t permute_workspace(int64_t tokens, int64_t top_k, int64_t experts) {
  return ((tokens * top_k + kPermuteChunk - 1) / kPermuteChunk + 1) * experts;
}

struct PermuteProblem {
  int64_t tokens = 0, top_k = 0, experts = 0, block = 0, rows = 0;
  const int32_t* expert_ids = nullptr;
  int32_t* expert_offsets = nullptr;
  int32_t* row_token = nullptr;
  int32_t* row_slot = nullptr;
  int32_t* block_expert = nullptr;
  int32_t* slot_row = nullptr;
  int32_t* workspace = nullptr;
};
void permute_cpu(const PermuteProblem& problem);
void permute_device(const PermuteProblem& problem, CudaStream stream);
void permute_device(const PermuteProblem& problem, EmuStream stream);

// grouped_gemm: the GEMM core over (expert, row-block) tiles of a permutation: for each block of
// `block` rows r with expert e = block_expert[r / block] >= 0,
//   out[r] = epilogue(A[r] · b[e]ᵀ),  A[r] = a[a_rows[r]] (a zero row for -1) or a[r]
// with b (E, n, k) like nn.Linear weights per expert; epilogue: none, times row_scale[r] (the routing
// weight of the row's pair), gelu (erf), or swiglu over b's stacked halves: out[r][j] = silu(g_j) u_j with g = rows
// [0, n/2) and u = rows [n/2, n) of b[e] (the CUDA kernel reads them as adjacent pairs). Blocks of
// expert -1 are zeros (every row of out is written: it needs no memset). a (rows of a, k) bf16/fp16 (fp32 too on the CPU kernel), out (R, n or n/2)
// a's dtype or fp32. The CUDA kernel's row blocks are kMoeBlock rows: `block` must be that there.
// b_k_major: b is (E, k, n) and out[r] = A[r] · b[e] (the backward's products with the weights as they
// are: dH = dY · W_down[e], dX = dGU · W_gate_up[e]); activation none or gelu then.
// pre (optional, swiglu or gelu, out in a's dtype): the pre-activation too, rounded to a's dtype, for
// down_backward: gelu (R, n); swiglu (R, n) with g_j and u_j at columns 2j and 2j + 1 (interleaved:
// the CUDA kernel's accumulator pairs), on every backend.
void grouped_gemm(const TensorView& a, const TensorView* a_rows, const TensorView& b, const TensorView& block_expert,
                  int64_t block, const TensorView* row_scale, gemm::Activation activation, bool b_k_major,
                  const TensorView& out, const TensorView* pre, void* stream);

constexpr int64_t kMoeBlock = 64;

struct GroupedProblem {
  DType dtype = DType::bf16, out_dtype = DType::bf16;
  int64_t rows = 0, n = 0, k = 0, experts = 0, block = 0, lda = 0;
  const void* a = nullptr;
  const int32_t* a_rows = nullptr;
  const void* b = nullptr;
  const int32_t* block_expert = nullptr;
  const float* row_scale = nullptr;
  gemm::Activation activation = gemm::Activation::none;
  bool b_k_major = false;
  void* out = nullptr;
  void* pre = nullptr;   // optional
};
void grouped_gemm_cpu(const GroupedProblem& problem);
void grouped_gemm_device(const GroupedProblem& problem, CudaStream stream);
void grouped_gemm_device(const GroupedProblem& problem, EmuStream stream);

// weight_grad: the weight gradients of the grouped GEMMs, for each expert e
//   out[e] = sum over rows r in [expert_offsets[e], expert_offsets[e + 1]) of A[r]ᵀ B[r]   (m, n)
// with A[r] = a[a_rows[r]] (a zero row for -1) or a[r], B[r] likewise from b and b_rows: dW_gate_up[e]
// = dGUᵀ X (a = dGU, b = x gathered by row_token), dW_down[e] = dYᵀ H (a = dY gathered, b = the
// routing-weighted H). a (rows, m) and b (rows, n) bf16/fp16 (fp32 too on the CPU kernel), out (E, m, n)
// a's dtype or fp32, fp32 accumulation; an expert with no rows gets zeros. expert_offsets int32
// (E + 1,), non-decreasing from 0, ending at most at R (the rows of a_rows / b_rows, or of a and b);
// each a multiple of kMoeBlock on the CUDA kernel (the permutation's layout with block kMoeBlock).
void weight_grad(const TensorView& a, const TensorView* a_rows, const TensorView& b, const TensorView* b_rows,
                 const TensorView& expert_offsets, const TensorView& out, void* stream);

struct WeightGradProblem {
  DType dtype = DType::bf16, out_dtype = DType::bf16;
  int64_t rows = 0, m = 0, n = 0, experts = 0, lda = 0, ldb = 0;
  const void* a = nullptr;
  const int32_t* a_rows = nullptr;
  const void* b = nullptr;
  const int32_t* b_rows = nullptr;
  const int32_t* expert_offsets = nullptr;
  void* out = nullptr;
};
// down_backward: the backward's first grouped GEMM with the activation's backward fused into its
// epilogue. For each row r of an active block (expert e, routing weight w = row_weight[r], the saved
// pre-activation pre[r]: (g, u) pairs interleaved (R, 2F) for swiglu, a (R, F) for gelu, as
// grouped_gemm saves it):
//   dz       = dout[row_token[r]] · W_down[e]          (F,) fp32 (a zero row for -1)
//   h        = silu(g) u, or gelu(a), from the saved (rounded) pre-activation, rounded to the inputs'
//              type (within a rounding of the forward's h, which came from the unrounded products)
//   dpre[r]  = [w dz u silu'(g) | w dz silu(g)] (stacked, like w_gate_up's rows), or w dz gelu'(a), rounded
//   weighted_h[r] = w h, rounded (dW_down's operand)
//   dweight_parts[r][p] = the sum of dz h over columns [32 p, 32 p + 32) (deterministic partial sums,
//                     down_parts(F) of them; their sum is the routing weight's gradient)
// Rows of blocks past the last expert are zeros in all three outputs (no memset needed).
// dout (T, H) bf16/fp16 (fp32 too on the CPU kernel), w_down (E, H, F), row_token int32 (R,) with
// values in [-1, T), block_expert from permute with kMoeBlock (values in [-1, E)).
void down_backward(const TensorView& dout, const TensorView& row_token, const TensorView& w_down,
                   const TensorView& block_expert, const TensorView& pre, const TensorView& row_weight,
                   gemm::Activation activation, const TensorView& dpre, const TensorView& weighted_h,
                   const TensorView& dweight_parts, void* stream);

constexpr int64_t kDownTileColumns = 64, kDownWarpsN = 2;   // the kernel's tile columns and warps across them
constexpr int64_t kDownPartColumns = kDownTileColumns / kDownWarpsN;
LLMK_HD int64_t down_parts(int64_t ffn) { return (ffn + kDownTileColumns - 1) / kDownTileColumns * kDownWarpsN; }

// One column of down_backward's epilogue (both backends): a = g (or gelu's input), u (swiglu), dz and
// w -> h rounded to T, d_first = d g (or d a), d_up = d u, before their rounding.
struct ColumnGrad { float h, d_first, d_up; };
template <typename T>
LLMK_HD ColumnGrad activation_backward(bool swiglu, float a, float u, float dz, float w) {
  const float dh = w * dz;
  ColumnGrad g{0.0f, 0.0f, 0.0f};
  if (swiglu) {
    const float sig = 1.0f / (1.0f + expf(-a)), silu = a * sig;
    g.h = to_float(from_float<T>(silu * u));
    g.d_first = dh * u * sig * (1.0f + a * (1.0f - sig));
    g.d_up = dh * silu;
  } else {
    const float cdf = 0.5f * (1.0f + erff(a * 0.70710678118654752f));
    g.h = to_float(from_float<T>(a * cdf));
    g.d_first = dh * (cdf + a * expf(-0.5f * a * a) * 0.39894228040143268f);
  }
  return g;
}

struct DownBackwardProblem {
  GroupedProblem dz;   // dZ = dout[row_token] · W_down k-major: rows R, n = F, k = H; float32, out unset
  const void* pre = nullptr;
  const float* row_weight = nullptr;
  gemm::Activation activation = gemm::Activation::swiglu;
  void* dpre = nullptr;
  void* weighted_h = nullptr;
  float* dweight_parts = nullptr;
};
void down_backward_cpu(const DownBackwardProblem& problem);
void down_backward_device(const DownBackwardProblem& problem, CudaStream stream);
void down_backward_device(const DownBackwardProblem& problem, EmuStream stream);

void weight_grad_cpu(const WeightGradProblem& problem);
void weight_grad_device(const WeightGradProblem& problem, CudaStream stream);
void weight_grad_device(const WeightGradProblem& problem, EmuStream stream);

}  // namespace llmk::moe
