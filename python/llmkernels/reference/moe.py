"""Mixture-of-Experts in plain PyTorch: routing, the auxiliary losses, the expert FFN and the
block-sparse layout the kernels work on.

    route(router_logits (T, E), top_k) -> weights (T, k), expert_ids int32 (T, k), RouteStats
    load_balancing_loss(router_logits, expert_ids)   Switch Transformer: E * sum_e f_e * P_e
    z_loss(router_logsumexp)                          ST-MoE: mean(logsumexp(logits)^2)
    moe_ffn(x (T, H), w_gate_up, w_down (E, H, F), weights, expert_ids) -> (T, H)
    permutation(expert_ids, num_experts, block) -> Permutation: (token, slot) pairs sorted by expert,
                                                   each expert's rows padded to a multiple of block
    interleave_gate_up(w_gate_up)                     stacked (gate; up) rows -> the GEMM core's pairs

Conventions, the same in every function:

- T tokens, E experts, k = top_k slots per token, H hidden size, F the expert FFN's inner size.
- Weights are laid out like nn.Linear's, (out_features, in_features), one per expert:
  swiglu: w_gate_up (E, 2F, H), rows [0, F) the gate projection, rows [F, 2F) the up projection
          (stacked, as Mixtral/vLLM's w13 = cat(w1, w3)); a = silu(x w_gateᵀ) * (x w_upᵀ).
  gelu:   w_gate_up (E, F, H), one up projection and no gate; a = gelu(x w_gate_upᵀ), erf form.
  Both:   w_down (E, H, F); expert e's output is y = a w_down[e]ᵀ, and F is read from w_down.
- Top-k selection: the k largest logits of a token in descending order, which are its k largest
  scores (softmax and sigmoid are increasing); equal logits are taken in ascending expert index (a
  stable descending sort). Selecting on the logits makes the choice independent of how the scores
  round: sigmoid(20) == sigmoid(30) == 1 in float32, yet expert 30's logit ranks first, as it does
  in the kernels (csrc/moe/route_select.h). torch.topk is not used: its order among equal values is
  unspecified and, measured on torch 2.13 (CPU), not by index (top-2 of four equal scores returned
  experts [2, 3], top-3 of eight [6, 5, 4]; 1868 of 2000 random rows with ties disagreed with
  lower-index-first). Without ties (in the logits or the scores) the choice and order are
  torch.topk's on the scores.
- Scores are computed in float32 from the logits' values (float64 for float64 logits, so that the
  reference stays a float64 oracle); routing weights and the router's logsumexp have that dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu")


def _dtype_name(t) -> str:
    return str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_float(name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor; got {_dtype_name(t)}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions; got shape {tuple(t.shape)}")


def _check_expert_ids(expert_ids, num_experts: int, tokens: Optional[int] = None) -> None:
    """expert_ids: int32 or int64 (T, k), k >= 1, every value in [0, num_experts)."""
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dtype not in _INDEX_DTYPES:
        raise TypeError(f"expert_ids must be an int32 or int64 tensor; got {_dtype_name(expert_ids)}")
    if expert_ids.dim() != 2 or expert_ids.shape[1] < 1:
        raise ValueError(f"expert_ids must have shape (tokens, top_k) with top_k >= 1; got {tuple(expert_ids.shape)}")
    if tokens is not None and expert_ids.shape[0] != tokens:
        raise ValueError(f"expert_ids must have {tokens} rows (one per token); got shape {tuple(expert_ids.shape)}")
    if expert_ids.numel() > 0:
        low, high = expert_ids.min().item(), expert_ids.max().item()
        if low < 0 or high >= num_experts:
            raise ValueError(f"expert_ids must lie in [0, {num_experts}) (num_experts = {num_experts}); "
                             f"got values from {low} to {high}")


def _check_scoring(scoring) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(map(repr, SCORINGS))}; got {scoring!r}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """softmax over the experts, or an independent sigmoid per expert, in float32 (float64)."""
    logits = logits.to(_compute_dtype(logits))
    return torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)


# -- routing -------------------------------------------------------------------------------------

@dataclasses.dataclass
class RouteStats:
    """tokens_per_expert: int32 (E,), how many (token, slot) pairs chose each expert (sums to T * k).
    router_logsumexp: (T,) logsumexp of each token's logits, float32 (float64 for float64 logits),
    differentiable with respect to the logits: z_loss's input."""
    tokens_per_expert: torch.Tensor
    router_logsumexp: torch.Tensor


def route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, scoring: str = "softmax"):
    """Top-k routing. router_logits (T, E) -> (weights (T, k), expert_ids int32 (T, k), RouteStats).

    scores = softmax(logits) over the E experts (scoring="softmax") or sigmoid(logits) per expert
    (scoring="sigmoid", DeepSeek-V3's), in float32 (float64 for float64 logits). Slot j of token t is
    its (j+1)-th largest logit (so score); equal logits go to the lower expert index first (module
    docstring).
    weights = the selected scores, divided by their sum over the k slots when `renormalize` (so each
    token's weights sum to 1; sigmoid scores that all underflow to 0 then give NaN, as 0 / 0).
    Differentiable with respect to the logits through the weights and the logsumexp.
    """
    _check_float("router_logits", router_logits, 2)
    _check_scoring(scoring)
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}] (the number of experts); got {top_k!r}")
    scores = _scores(router_logits, scoring)
    if torch.isnan(scores).any():
        raise ValueError("router_logits must give finite scores: a row has a NaN, a +inf or only -inf logits")
    ranked = router_logits.detach().to(scores.dtype)
    expert_ids = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, expert_ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    stats = RouteStats(
        tokens_per_expert=torch.bincount(expert_ids.reshape(-1), minlength=num_experts).to(torch.int32),
        router_logsumexp=torch.logsumexp(router_logits.to(scores.dtype), dim=-1))
    return weights, expert_ids.to(torch.int32), stats


# -- auxiliary losses ----------------------------------------------------------------------------

def load_balancing_loss(router_logits: torch.Tensor, expert_ids: torch.Tensor, *,
                        scoring: str = "softmax") -> torch.Tensor:
    """The Switch Transformer's auxiliary loss, E * sum_e f_e * P_e, a 0-d tensor.

    router_logits (T, E), T >= 1, the logits `route` was given; expert_ids (T, k), what it returned.
    f_e = (number of (token, slot) pairs with expert e) / (T * k): the fraction of assignments, no
      gradient. With k = 1 and perfectly even routing f_e = 1/E.
    P_e = the mean over tokens of each token's router probability of e: softmax(logits) for
      scoring="softmax"; for scoring="sigmoid", the sigmoid scores divided by their sum over the E
      experts (DeepSeek-V3's normalization), so that P sums to 1 either way.
    Equals 1 whenever routing or probabilities are uniform; E * P_e when every pair picks expert e.
    Float32 (float64 for float64 logits), differentiable with respect to the logits.
    """
    _check_float("router_logits", router_logits, 2)
    _check_scoring(scoring)
    tokens, num_experts = router_logits.shape
    if tokens == 0:
        raise ValueError("router_logits must have at least one token (row); got shape "
                         f"{tuple(router_logits.shape)}")
    _check_expert_ids(expert_ids, num_experts, tokens)
    probs = _scores(router_logits, scoring)
    if scoring == "sigmoid":
        probs = probs / probs.sum(dim=-1, keepdim=True)
    counts = torch.bincount(expert_ids.reshape(-1).long(), minlength=num_experts).to(probs.dtype)
    fraction = counts / expert_ids.numel()                         # f_e, (E,)
    mean_prob = probs.mean(dim=0)                                  # P_e, (E,)
    return num_experts * (fraction * mean_prob).sum()


def z_loss(router_logsumexp: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2, a 0-d tensor of the
    input's dtype (RouteStats.router_logsumexp, shape (T,), T >= 1). Differentiable."""
    _check_float("router_logsumexp", router_logsumexp, 1)
    if router_logsumexp.numel() == 0:
        raise ValueError("router_logsumexp must have at least one token; got shape (0,)")
    return (router_logsumexp ** 2).mean()


# -- the expert FFN ------------------------------------------------------------------------------

def _check_ffn(x, w_gate_up, w_down, weights, expert_ids, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")
    _check_float("x", x, 2)
    _check_float("w_gate_up", w_gate_up, 3)
    _check_float("w_down", w_down, 3)
    _check_float("weights", weights, 2)
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise TypeError(f"w_gate_up and w_down must have x's dtype ({x.dtype}); got {w_gate_up.dtype} and "
                        f"{w_down.dtype}")
    tokens, hidden = x.shape
    num_experts, _, ffn = w_down.shape
    if w_down.shape[1] != hidden:
        raise ValueError(f"w_down must have shape (num_experts, hidden={hidden}, ffn); got {tuple(w_down.shape)}")
    if w_gate_up.shape[0] != num_experts:
        raise ValueError(f"w_gate_up and w_down must have one number of experts; got {w_gate_up.shape[0]} "
                         f"(w_gate_up {tuple(w_gate_up.shape)}) and {num_experts} (w_down {tuple(w_down.shape)})")
    rows = 2 * ffn if activation == "swiglu" else ffn
    if tuple(w_gate_up.shape) != (num_experts, rows, hidden):
        what = "2 * ffn (gate; up)" if activation == "swiglu" else "ffn (gelu has no gate)"
        raise ValueError(f"w_gate_up must have shape ({num_experts}, {rows}, {hidden}) (num_experts, {what}, "
                         f"hidden) for {activation} with w_down {tuple(w_down.shape)}; got {tuple(w_gate_up.shape)}")
    _check_expert_ids(expert_ids, num_experts, tokens)
    if weights.shape != expert_ids.shape:
        raise ValueError(f"weights and expert_ids must have one shape (tokens, top_k); got "
                         f"{tuple(weights.shape)} and {tuple(expert_ids.shape)}")
    devices = {t.device for t in (x, w_gate_up, w_down, weights, expert_ids)}
    if len(devices) != 1:
        raise RuntimeError(f"x, w_gate_up, w_down, weights and expert_ids must be on one device; got "
                           f"{', '.join(sorted(map(str, devices)))}")


def moe_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
            expert_ids: torch.Tensor, *, activation: str = "swiglu", upcast: bool = True,
            compute_dtype: Optional[torch.dtype] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The routed expert FFN: out[t] = sum over slots s of weights[t, s] * FFN_{expert_ids[t, s]}(x[t]).

    x (T, H); w_gate_up and w_down as in the module docstring (x's dtype); weights (T, k) any float
    dtype; expert_ids (T, k) int32 or int64 in [0, E). A token that names one expert in two slots gets
    both contributions. Experts are visited in ascending order, each on the rows gathered for it.

    upcast=True: the arithmetic (both matmuls, the activation, the weighted sum) in `compute_dtype`
      (float32 by default, float64 for float64 x; pass torch.float64 for a float64 oracle of 16-bit
      inputs) from the inputs' values, rounded once to `out_dtype` (default x's dtype).
    upcast=False: what a user without the kernel computes, the baseline of the parity rule: every
      matmul, the activation and the accumulation in x's dtype (torch's own 16-bit matmuls), the
      routing weights rounded to x's dtype first. `compute_dtype` must then be None.
    Differentiable with respect to x, w_gate_up, w_down and weights (plain torch ops, out-of-place
    index_add).
    """
    _check_ffn(x, w_gate_up, w_down, weights, expert_ids, activation)
    if not upcast and compute_dtype is not None:
        raise ValueError(f"compute_dtype must be None with upcast=False (which computes in x's dtype); "
                         f"got {compute_dtype}")
    if compute_dtype is None:
        compute_dtype = (torch.float64 if x.dtype == torch.float64 else torch.float32) if upcast else x.dtype
    elif compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float32 or torch.float64; got {compute_dtype}")
    tokens, top_k = expert_ids.shape
    ffn = w_down.shape[2]
    xc, w1, w2 = (t.to(compute_dtype) for t in (x, w_gate_up, w_down))
    slot_expert = expert_ids.reshape(-1).long()                                    # (T * k,) pair p = t * k + s
    slot_token = torch.arange(tokens, device=x.device).repeat_interleave(top_k)
    slot_weight = weights.reshape(-1).to(compute_dtype)
    out = torch.zeros(tokens, x.shape[1], dtype=compute_dtype, device=x.device)
    for e in range(w_down.shape[0]):
        pairs = (slot_expert == e).nonzero().reshape(-1)
        if pairs.numel() == 0:
            continue
        token = slot_token[pairs]
        h = xc[token] @ w1[e].T                                                    # (T_e, 2F) or (T_e, F)
        a = F.silu(h[:, :ffn]) * h[:, ffn:] if activation == "swiglu" else F.gelu(h)
        y = a @ w2[e].T                                                            # (T_e, H)
        out = out.index_add(0, token, y * slot_weight[pairs, None])
    return out.to(out_dtype or x.dtype)


def interleave_gate_up(w_gate_up: torch.Tensor) -> torch.Tensor:
    """(E, 2F, H) stacked rows (gate rows [0, F), up rows [F, 2F)) -> (E, 2F, H) with gate row j at
    2j and up row j at 2j + 1: the GEMM core's swiglu pairs adjacent output columns (docs/gemm.md),
    so a kernel built on it reads the weight in this order."""
    _check_float("w_gate_up", w_gate_up, 3)
    num_experts, rows, hidden = w_gate_up.shape
    if rows % 2:
        raise ValueError(f"w_gate_up must have an even number of rows (2 * ffn); got shape {tuple(w_gate_up.shape)}")
    return w_gate_up.reshape(num_experts, 2, rows // 2, hidden).transpose(1, 2).reshape(num_experts, rows, hidden)


# -- the block-sparse layout ---------------------------------------------------------------------

@dataclasses.dataclass
class Permutation:
    """Rows of the grouped GEMM: the (token, slot) pairs sorted by expert, each expert padded.

    expert_offsets int32 (E + 1,): expert e owns rows [expert_offsets[e], expert_offsets[e + 1]),
      a multiple of `block` long (0 rows for an expert nobody chose); expert_offsets[0] = 0.
    row_token, row_slot int32 (rows,): the pair a row computes; within an expert, ascending token
      then slot; the expert's padding rows follow its real rows and hold -1 in both.
    block_expert int32 (rows / block,): the expert of each block of `block` rows (one expert per
      block, never straddled); -1 for blocks past expert_offsets[E].
    slot_row int32 (T, k): the row of pair (t, s), the inverse of (row_token, row_slot).
    rows = expert_offsets[E], or max_padded_rows(T, k, E, block) with worst_case=True (the
      rows past expert_offsets[E] are then padding: -1).
    """
    row_token: torch.Tensor
    row_slot: torch.Tensor
    expert_offsets: torch.Tensor
    block_expert: torch.Tensor
    slot_row: torch.Tensor


def max_padded_rows(num_tokens: int, top_k: int, num_experts: int, block: int) -> int:
    """The most rows any routing can need, T * k + E * (block - 1): each expert pads fewer than
    `block` rows. The size to allocate for a layout built on the device (CUDA graphs)."""
    return num_tokens * top_k + num_experts * (block - 1)


def permutation(expert_ids: torch.Tensor, num_experts: int, block: int, *, worst_case: bool = False) -> Permutation:
    """The block-sparse layout (Permutation's docstring) of a routing, expert_ids (T, k) int32/int64.
    worst_case=True: the row tensors have max_padded_rows(T, k, E, block) rows, a multiple of
    `block` only when T * k is; block_expert then has ceil(rows / block) entries."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer; got {num_experts!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}")
    _check_expert_ids(expert_ids, num_experts)
    tokens, top_k = expert_ids.shape
    device = expert_ids.device
    flat = expert_ids.reshape(-1).long()                                       # pair p = t * k + s, ascending
    order = torch.sort(flat, stable=True).indices                              # by expert, then by p
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block - 1) // block * block
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(padded, dim=0)
    rows = max_padded_rows(tokens, top_k, num_experts, block) if worst_case else int(offsets[-1])
    row_pair = torch.full((rows,), -1, dtype=torch.int64, device=device)
    start = 0                                                                  # into `order`
    for e in range(num_experts):
        n = int(counts[e])
        row_pair[int(offsets[e]):int(offsets[e]) + n] = order[start:start + n]
        start += n
    real = row_pair >= 0
    row_token = torch.where(real, row_pair // top_k, -1)
    row_slot = torch.where(real, row_pair % top_k, -1)
    slot_row = torch.empty(tokens * top_k, dtype=torch.int64, device=device)
    slot_row[row_pair[real]] = torch.arange(rows, device=device)[real]
    blocks = (rows + block - 1) // block
    block_start = torch.arange(blocks, device=device) * block
    block_expert = torch.searchsorted(offsets, block_start, right=True) - 1   # offsets[e] <= start < offsets[e+1]
    block_expert = torch.where(block_start < offsets[-1], block_expert, -1)
    return Permutation(row_token=row_token.to(torch.int32), row_slot=row_slot.to(torch.int32),
                       expert_offsets=offsets.to(torch.int32), block_expert=block_expert.to(torch.int32),
                       slot_row=slot_row.reshape(tokens, top_k).to(torch.int32))
