"""Mixture-of-Experts (csrc/moe/, docs/moe.md): the router (differentiable), the auxiliary losses, the
block-sparse permutation, the experts' FFN (forward and backward) and the MoE layer; no host
synchronization anywhere, no token dropped.

    weights, expert_ids, stats = route(router_logits, top_k)     one kernel: scores, top-k, weights,
                                                                 per-expert counts, router logsumexp;
                                                                 backward (weights, logsumexp) in torch
    load_balancing_loss(router_logits, stats)                    Switch Transformer's auxiliary loss, from
                                                                 route's counts and logsumexp (or expert_ids)
    z_loss(stats.router_logsumexp)                               ST-MoE's router z-loss
    out = moe_ffn(x, w_gate_up, w_down, weights, expert_ids)     the routed experts' FFN, differentiable
                                                                 (x, both weights, the routing weights)
    out, aux = MoE(hidden, ffn, experts, top_k)(x)               router + route + moe_ffn; aux: the losses,
                                                                 the counts, aux.total (coefficient-weighted)

Conventions (llmkernels.reference.moe): the top-k are the k largest logits (so scores) in descending
order, equal logits to the lower expert index; weights are the selected scores (softmax over the
experts, or sigmoid), renormalized to sum to 1 by default.
"""
import dataclasses
import functools
from typing import Optional, Tuple

import torch

from . import _validate as check
from ._ext import C
from ._ops import native_op
from .reference import moe as _reference

__all__ = ["RouteStats", "route", "Permutation", "permute", "moe_ffn", "load_balancing_loss", "z_loss", "MoE",
           "MoEAux"]

Permutation = _reference.Permutation

SCORINGS = {"softmax": 0, "sigmoid": 1}
MAX_EXPERTS = 1024
# The CUDA permutation's pairs per block (csrc/moe/moe.h: kPermuteChunk), for its workspace's size.
PERMUTE_CHUNK = C.moe_permute_chunk()


@dataclasses.dataclass
class RouteStats:
    tokens_per_expert: torch.Tensor   # int32 (E,): (token, slot) selections per expert
    router_logsumexp: torch.Tensor    # float32 (T,): logsumexp of each token's logits (for z_loss)


@native_op("moe_route")
def _route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
           scoring: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weights float32 (T, k), expert_ids int32 (T, k), tokens_per_expert int32 (E,), logsumexp float32 (T,)."""
    t, e = router_logits.shape
    device = router_logits.device
    return (torch.empty((t, top_k), dtype=torch.float32, device=device),
            torch.empty((t, top_k), dtype=torch.int32, device=device),
            torch.empty((e,), dtype=torch.int32, device=device),
            torch.empty((t,), dtype=torch.float32, device=device))


def route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True,
          scoring: str = "softmax") -> Tuple[torch.Tensor, torch.Tensor, RouteStats]:
    """Top-k routing of T tokens over E experts (E <= 1024), one kernel (CPU or CUDA, no host sync):
    router_logits (T, E) float32/bf16/fp16 -> (weights float32 (T, k), expert_ids int32 (T, k),
    RouteStats). Differentiable with respect to the logits through the weights and
    stats.router_logsumexp, as llmkernels.reference.moe.route (the selection is held fixed): the
    backward is a few float32 torch ops (_route_backward), the gradient in the logits' dtype. Without
    grad to record the kernel runs alone."""
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError(f"router_logits must be a 2-D tensor (tokens, experts); got "
                         f"{tuple(getattr(router_logits, 'shape', ()))}")
    if router_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"router_logits must be float32, bfloat16 or float16; got {router_logits.dtype}")
    experts = router_logits.shape[1]
    if not 1 <= experts <= MAX_EXPERTS:
        raise ValueError(f"router_logits must have 1 to {MAX_EXPERTS} experts (columns); got {experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be an integer in [1, {experts}] (the number of experts); got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {tuple(SCORINGS)}; got {scoring!r}")
    logits = router_logits if router_logits.stride(-1) == 1 or experts == 1 else router_logits.contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        weights, ids, counts, lse = _RouteFunction.apply(logits, top_k, bool(renormalize), SCORINGS[scoring])
    else:
        weights, ids, counts, lse = _route(logits.detach(), top_k, bool(renormalize), SCORINGS[scoring])
    return weights, ids, RouteStats(counts, lse)


class _RouteFunction(torch.autograd.Function):
    """route with autograd: the kernel forward; the backward recomputes the scores it needs from the
    logits and the selection (saved with the kernel's weights and logsumexp)."""

    @staticmethod
    def forward(ctx, logits, top_k, renormalize, scoring):
        weights, ids, counts, lse = _route(logits.detach(), top_k, renormalize, scoring)
        ctx.save_for_backward(logits, weights, ids, lse)
        ctx.renormalize, ctx.sigmoid = renormalize, scoring == SCORINGS["sigmoid"]
        ctx.mark_non_differentiable(ids, counts)
        ctx.set_materialize_grads(False)     # an unused output's gradient arrives as None: no work for it
        return weights, ids, counts, lse

    @staticmethod
    def backward(ctx, grad_weights, grad_ids, grad_counts, grad_lse):
        logits, weights, ids, lse = ctx.saved_tensors
        return _route_backward(logits, weights, ids, lse, grad_weights, grad_lse, ctx.renormalize,
                               ctx.sigmoid), None, None, None


def _route_backward(logits, weights, ids, lse, grad_weights, grad_lse, renormalize: bool, sigmoid: bool):
    """d(loss)/d(logits) in float32, returned in the logits' dtype. l the logits, sel the k selected
    experts (distinct), w the weights (T, k), g their gradient, G the logsumexp's, p = softmax(l):
      softmax, renormalized (w = softmax over l[sel]):  dl[sel] = w (g - sum w g)
      softmax, not renormalized (w = p[sel]):            dl = scatter(w g) - p sum w g
      sigmoid (s = sigmoid(l[sel])), not renormalized:   dl[sel] = g s (1 - s)
      sigmoid, renormalized (w = s / S, S = sum s):      dl[sel] = (g - sum w g) / S * s (1 - s)
      the logsumexp:                                     dl += G p"""
    l = logits.float()
    grad = torch.zeros_like(l)
    p_coefficient = None                                     # (T, 1): the multiple of p that dl gets
    if grad_weights is not None:
        g = grad_weights.float()
        index = ids.long()
        weighted_sum = (weights * g).sum(dim=1, keepdim=True)
        if sigmoid:
            s = torch.sigmoid(l.gather(1, index))
            dscore = (g - weighted_sum) / s.sum(dim=1, keepdim=True) if renormalize else g
            selected = dscore * s * (1 - s)
        elif renormalize:
            selected = weights * (g - weighted_sum)
        else:
            selected = weights * g
            p_coefficient = -weighted_sum
        grad = grad.scatter(1, index, selected)
    if grad_lse is not None:
        p_coefficient = grad_lse.float()[:, None] + (0 if p_coefficient is None else p_coefficient)
    if p_coefficient is not None:
        grad = grad + p_coefficient * torch.exp(l - lse[:, None])
    return grad.to(logits.dtype)


@native_op("moe_permute")
def _permute(expert_ids: torch.Tensor, num_experts: int,
             block: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_offsets (E + 1,), row_token (R,), row_slot (R,), block_expert (ceil(R / block),), slot_row (T, k),
    workspace; all int32, R = T k + E (block - 1)."""
    t, k = expert_ids.shape
    rows = t * k + num_experts * (block - 1)
    chunks = (t * k + PERMUTE_CHUNK - 1) // PERMUTE_CHUNK
    scratch = (chunks + 1) * num_experts if check.device_kernels(expert_ids) else 0
    empty = lambda *shape: torch.empty(shape, dtype=torch.int32, device=expert_ids.device)
    return (empty(num_experts + 1), empty(rows), empty(rows), empty((rows + block - 1) // block), empty(t, k),
            empty(scratch))


def permute(expert_ids: torch.Tensor, num_experts: int, block: int) -> Permutation:
    """The block-sparse layout of a routing (llmkernels.reference.moe.permutation with worst_case=True):
    the (token, slot) pairs sorted by expert, stable, each expert padded to a multiple of `block`
    rows, in buffers of the worst-case size T k + E (block - 1), computed on the routing's device with
    no host synchronization (CUDA-graph capturable). expert_ids int32/int64 (T, k) in [0, E): checked
    for CPU tensors; on a GPU, asserted asynchronously (a device-side assert, no synchronization)."""
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() != 2 or expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_ids must be a 2-D int32 or int64 tensor (tokens, top_k); got "
                        f"{getattr(expert_ids, 'dtype', type(expert_ids).__name__)} of shape "
                        f"{tuple(getattr(expert_ids, 'shape', ()))}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be an integer in [1, {MAX_EXPERTS}]; got {num_experts!r}")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1024:
        raise ValueError(f"block must be an integer in [1, 1024]; got {block!r}")
    if expert_ids.device.type == "cuda" and expert_ids.numel():
        torch._assert_async(((expert_ids >= 0) & (expert_ids < num_experts)).all(),
                            f"expert_ids must be in [0, {num_experts}) (the number of experts)")
    ids = expert_ids.to(torch.int32).contiguous()
    offsets, row_token, row_slot, block_expert, slot_row, _ = _permute(ids, num_experts, block)
    return Permutation(row_token=row_token, row_slot=row_slot, expert_offsets=offsets, block_expert=block_expert,
                       slot_row=slot_row)


BLOCK = C.moe_block()
_ACTIVATION_CODES = {"none": 0, "gelu": 2, "swiglu": 3}


@native_op("moe_grouped_gemm")
def _grouped_gemm_op(a: torch.Tensor, a_rows: Optional[torch.Tensor], b: torch.Tensor, block_expert: torch.Tensor,
                     block: int, row_scale: Optional[torch.Tensor], activation: int, b_k_major: bool, save_pre: bool,
                     rows: int, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """out (rows, n or n / 2 for swiglu) in out_dtype (every row written: zeros past the last expert),
    and with save_pre the pre-activation (rows, n) in a's dtype (moe.h: interleaved (g, u) pairs on the
    CUDA kernels, [g | u] on the CPU), else an empty (0, n); b (E, n, k), or (E, k, n) when b_k_major."""
    n = b.shape[2] if b_k_major else b.shape[1]
    out_columns = n // 2 if activation == _ACTIVATION_CODES["swiglu"] else n
    return (torch.empty((rows, out_columns), dtype=out_dtype, device=a.device),
            torch.empty((rows if save_pre else 0, n), dtype=a.dtype, device=a.device))


def _grouped_gemm(a, a_rows, b, block_expert, block, row_scale, activation, b_k_major, rows, out_dtype):
    return _grouped_gemm_op(a, a_rows, b, block_expert, block, row_scale, activation, b_k_major, False, rows,
                            out_dtype)[0]


_DOWN_TILE_COLUMNS, _DOWN_WARPS = C.moe_down_tiling()


@native_op("moe_down_backward")
def _down_backward(dout: torch.Tensor, row_token: torch.Tensor, w_down: torch.Tensor, block_expert: torch.Tensor,
                   pre: torch.Tensor, row_weight: torch.Tensor,
                   activation: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dpre (like pre, [dg | du] stacked), weighted_h (R, F) and the routing-weight gradient's partial sums
    float32 (R, parts): the dZ grouped GEMM with the activation's backward in its epilogue (moe.h)."""
    rows, ffn = row_token.shape[0], w_down.shape[2]
    parts = (ffn + _DOWN_TILE_COLUMNS - 1) // _DOWN_TILE_COLUMNS * _DOWN_WARPS   # (plain arithmetic: symbolic ffn)
    empty = functools.partial(torch.empty, device=dout.device)   # (every row written)
    return (empty(pre.shape, dtype=pre.dtype), empty((rows, ffn), dtype=dout.dtype),
            empty((rows, parts), dtype=torch.float32))


@native_op("moe_weight_grad")
def _weight_grad(a: torch.Tensor, a_rows: Optional[torch.Tensor], b: torch.Tensor, b_rows: Optional[torch.Tensor],
                 expert_offsets: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """out (E, m, n): out[e] = sum over expert e's rows r of a[r]ᵀ b[r] (rows gathered through a_rows, b_rows)."""
    return torch.empty((expert_offsets.shape[0] - 1, a.shape[1], b.shape[1]), dtype=out_dtype, device=a.device)


def _combine(rows: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    """(T, n): each token's k rows of `rows` (R, n) added in slot order (deterministic)."""
    tokens, top_k = slot_row.shape
    return rows.index_select(0, slot_row.reshape(-1).long()).reshape(tokens, top_k, rows.shape[1]).sum(dim=1)


class _MoeFFN(torch.autograd.Function):
    """moe_ffn with its backward. Forward for training (`save_pre`): the first grouped GEMM writes the
    pre-activation too (saved: the activation is recomputed from it in the backward rather than h
    stored), then the second grouped GEMM scaled by the routing weights. Backward, for dout (T, H):
        dZ[r]       = dout[token r] · W_down[e]                   down_backward: a grouped GEMM with
        dweights    = <dZ[r], h[r]> at (token, slot) of r         k-major weights and gathered rows,
        dPre        = activation'(pre) applied to weights[r] dZ[r] and these three, with weights[r] h[r],
                                                                  in its epilogue
        dX          = sum over slots of dPre[r] · W_gate_up[e]    grouped GEMM, k-major, then the combine
        dW_gate_up[e] = sum over e's rows of dPre[r]ᵀ x[token r]  weight_grad
        dW_down[e]    = sum over e's rows of dout[token r]ᵀ weights[r] h[r]  weight_grad
    Every sum is in a fixed order (no float atomics): the gradients are deterministic. Each op runs on
    the backend of its tensors (CPU, emulated or CUDA) with one layout everywhere, so a forward and its
    backward may run on different ones."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, weights, expert_ids, activation, save_pre):
        perm = permute(expert_ids, w_down.shape[0], BLOCK)
        rows = perm.row_token.shape[0]
        slots = perm.slot_row.reshape(-1).long()
        # each pair's routing weight at its row (0 on padding rows)
        row_weight = torch.zeros(rows, dtype=torch.float32, device=x.device).index_copy_(
            0, slots, weights.reshape(-1).float())
        x = check.rows_aligned(x)
        w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()
        h, pre = _grouped_gemm_op(x, perm.row_token, w_gate_up, perm.block_expert, BLOCK, None,
                                  _ACTIVATION_CODES[activation], False, save_pre, rows, x.dtype)
        if save_pre:
            ctx.save_for_backward(x, w_gate_up, w_down, pre, row_weight, perm.row_token, perm.block_expert,
                                  perm.slot_row, perm.expert_offsets)
            ctx.activation = activation
            ctx.weights_dtype = weights.dtype
        y = _grouped_gemm(h, None, w_down, perm.block_expert, BLOCK, row_weight, _ACTIVATION_CODES["none"], False,
                          rows, torch.float32)
        return _combine(y, perm.slot_row).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, w_gate_up, w_down, pre, row_weight, row_token, block_expert, slot_row, offsets = ctx.saved_tensors
        need_x, need_gate_up, need_down, need_weights = ctx.needs_input_grad[:4]
        dout = check.rows_aligned(dout.to(x.dtype))
        dpre, weighted_h, parts = _down_backward(dout, row_token, w_down, block_expert, pre, row_weight,
                                                 _ACTIVATION_CODES[ctx.activation])
        dx = dw_gate_up = dw_down = dweights = None
        if need_x:
            dx_rows = _grouped_gemm(dpre, None, w_gate_up, block_expert, BLOCK, None, _ACTIVATION_CODES["none"], True,
                                    row_token.shape[0], torch.float32)
            dx = _combine(dx_rows, slot_row).to(x.dtype)
        if need_gate_up:
            dw_gate_up = _weight_grad(dpre, None, x, row_token, offsets, x.dtype)
        if need_down:
            dw_down = _weight_grad(dout, row_token, weighted_h, None, offsets, x.dtype)
        if need_weights:
            dweights = parts.sum(dim=1).index_select(0, slot_row.reshape(-1).long())
            dweights = dweights.reshape(slot_row.shape).to(ctx.weights_dtype)
        return dx, dw_gate_up, dw_down, dweights, None, None, None


def moe_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
            expert_ids: torch.Tensor, *, activation: str = "swiglu") -> torch.Tensor:
    """The routed experts' FFN (llmkernels.reference.moe.moe_ffn's semantics): x (T, H), w_gate_up
    (E, 2F, H) stacked [gate; up] for swiglu or (E, F, H) for gelu, w_down (E, H, F), routing weights
    (T, k) and expert_ids (T, k) -> (T, H) in x's dtype. No token is dropped. Differentiable with
    respect to x, both weight tensors and the routing weights (_MoeFFN: the backward's grouped GEMMs
    and per-expert weight gradients). The forward: the permutation (permute, blocks of BLOCK rows), a
    grouped GEMM with the gathered tokens and the activation fused (h in x's dtype), a grouped GEMM
    scaled by the routing weights in its epilogue (float32), then each token's k rows added in slot
    order (deterministic). No host synchronization, forward or backward."""
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"activation must be 'swiglu' or 'gelu'; got {activation!r}")
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down), ("weights", weights)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {getattr(t, 'dtype', type(t).__name__)}")
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"x must be (T, H), w_gate_up (E, 2F or F, H), w_down (E, H, F); got {tuple(x.shape)}, "
                         f"{tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    experts, hidden, ffn = w_down.shape
    up_rows = 2 * ffn if activation == "swiglu" else ffn
    if tuple(w_gate_up.shape) != (experts, up_rows, hidden) or x.shape[1] != hidden:
        raise ValueError(f"w_gate_up must be ({experts}, {up_rows}, {hidden}) for {activation} with w_down "
                         f"{tuple(w_down.shape)} and x {tuple(x.shape)}; got {tuple(w_gate_up.shape)}")
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise TypeError(f"w_gate_up and w_down must have x's dtype {x.dtype}; got {w_gate_up.dtype}, {w_down.dtype}")
    if weights.shape != expert_ids.shape or weights.dim() != 2 or weights.shape[0] != x.shape[0]:
        raise ValueError(f"weights and expert_ids must both be (T, k) with T = {x.shape[0]}; got "
                         f"{tuple(weights.shape)} and {tuple(getattr(expert_ids, 'shape', ()))}")
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, weights))
    return _MoeFFN.apply(x, w_gate_up, w_down, weights, expert_ids, activation, save_pre)


def load_balancing_loss(router_logits: torch.Tensor, expert_ids_or_stats, *, scoring: str = "softmax") -> torch.Tensor:
    """The Switch Transformer's auxiliary loss E * sum_e f_e * P_e (llmkernels.reference.moe.load_balancing_loss:
    f_e the fraction of (token, slot) pairs routed to e, no gradient; P_e the mean router probability of e),
    a 0-d float32 tensor (float64 for float64 logits), differentiable with respect to router_logits (T, E), T >= 1.

    Given route's RouteStats (what MoE does), f_e comes from its tokens_per_expert, and for scoring="softmax"
    the probabilities from its router_logsumexp: exp(logits - logsumexp), with no max pass over the logits,
    then normalized over the experts once more, which cancels the logsumexp's fp32 rounding (a relative
    error common to a token's row, up to half an ulp of the logsumexp) and makes P independent of it, so
    the gradient is softmax's whether or not route ran with grad. For scoring="sigmoid" P is
    sigmoid(logits) normalized over the experts (the logsumexp is not used). P and the sums are in float64
    (T x E elements, small beside the experts' GEMMs): the value is within half an ulp of the exact loss
    (in float32 it was up to 3.2 ulps off; 600 random cases each). Given expert_ids (T, k) instead, it is
    the reference's function."""
    if not isinstance(expert_ids_or_stats, RouteStats):
        return _reference.load_balancing_loss(router_logits, expert_ids_or_stats, scoring=scoring)
    _reference._check_float("router_logits", router_logits, 2)
    _reference._check_scoring(scoring)
    tokens, experts = router_logits.shape
    counts, lse = expert_ids_or_stats.tokens_per_expert, expert_ids_or_stats.router_logsumexp
    if tokens == 0:
        raise ValueError(f"router_logits must have at least one token (row); got shape {tuple(router_logits.shape)}")
    if tuple(counts.shape) != (experts,) or tuple(lse.shape) != (tokens,):
        raise ValueError(f"stats must come from route on router_logits {tuple(router_logits.shape)}: "
                         f"tokens_per_expert ({experts},) and router_logsumexp ({tokens},); got "
                         f"{tuple(counts.shape)} and {tuple(lse.shape)}")
    logits = router_logits.double()
    if scoring == "softmax":
        probs = torch.exp(logits - lse.detach().double()[:, None])
    else:
        probs = torch.sigmoid(logits)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    counts = counts.double()
    fraction = counts / counts.sum()                       # sum = T k, on the device: no host synchronization
    return (experts * (fraction * probs.mean(dim=0)).sum()).to(_reference._compute_dtype(router_logits))


z_loss = _reference.z_loss


# -- the layer -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MoEAux:
    """What MoE.forward returns beside its output. load_balancing_loss and z_loss: 0-d float32 tensors,
    differentiable with respect to the router; tokens_per_expert: int32 (E,), the routing's counts;
    total = load_balancing_coef * load_balancing_loss + z_loss_coef * z_loss, the term to add to the
    training loss (loss = task_loss + aux.total)."""
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    total: torch.Tensor


class MoE(torch.nn.Module):
    """A routed-experts FFN layer (Mixtral / Qwen3-MoE / DeepSeek style, no token dropped):
    router = nn.Linear(hidden, experts, bias=False); route (top_k of the router's logits, `scoring`,
    `renormalize`); moe_ffn with the parameters w_gate_up (experts, 2 ffn, hidden) for swiglu, stacked
    [gate; up], or (experts, ffn, hidden) for gelu, and w_down (experts, hidden, ffn), initialized like
    nn.Linear's weights (uniform in +-1/sqrt(fan_in)).

    forward(x (..., hidden)) -> (out of x's shape and dtype, MoEAux). hidden and ffn are multiples of 8
    (the kernels' vector width); the parameters' dtype is float32, bfloat16 or float16 (the CUDA and
    emulated kernels of moe_ffn take bfloat16/float16, the CPU kernel also float32)."""

    def __init__(self, hidden: int, ffn: int, experts: int, top_k: int, *, activation: str = "swiglu",
                 scoring: str = "softmax", renormalize: bool = True, load_balancing_coef: float = 0.01,
                 z_loss_coef: float = 0.001, device=None, dtype=None):
        super().__init__()
        for name, value in (("hidden", hidden), ("ffn", ffn)):
            check.integer(value, name, 1, 2 ** 31)
            if value % 8:
                raise ValueError(f"{name} must be a multiple of 8; got {value}")
        check.integer(experts, "experts", 1, MAX_EXPERTS + 1)
        check.integer(top_k, "top_k", 1, 2 ** 31)
        if top_k > experts:
            raise ValueError(f"top_k must be <= experts ({experts}); got {top_k}")
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation must be 'swiglu' or 'gelu'; got {activation!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {tuple(SCORINGS)}; got {scoring!r}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in check.FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {check.dtype_names(check.FLOAT_DTYPES)}; got {dtype}")
        self.hidden, self.ffn, self.experts, self.top_k = int(hidden), int(ffn), int(experts), int(top_k)
        self.activation, self.scoring, self.renormalize = activation, scoring, bool(renormalize)
        self.load_balancing_coef = check.float32_value(load_balancing_coef, "load_balancing_coef", minimum=0.0)
        self.z_loss_coef = check.float32_value(z_loss_coef, "z_loss_coef", minimum=0.0)
        factory = {"device": device, "dtype": dtype}
        up_rows = 2 * self.ffn if activation == "swiglu" else self.ffn
        self.router = torch.nn.Linear(self.hidden, self.experts, bias=False, **factory)
        self.w_gate_up = torch.nn.Parameter(torch.empty(self.experts, up_rows, self.hidden, **factory))
        self.w_down = torch.nn.Parameter(torch.empty(self.experts, self.hidden, self.ffn, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        torch.nn.init.uniform_(self.w_gate_up, -self.hidden ** -0.5, self.hidden ** -0.5)
        torch.nn.init.uniform_(self.w_down, -self.ffn ** -0.5, self.ffn ** -0.5)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, MoEAux]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden:
            raise ValueError(f"x must have shape (..., hidden={self.hidden}); got {tuple(x.shape)}")
        if x.dtype != self.w_down.dtype:
            raise TypeError(f"x must have the parameters' dtype {self.w_down.dtype}; got {x.dtype}")
        tokens = x.reshape(-1, self.hidden)
        if tokens.shape[0] == 0:
            raise ValueError(f"x must hold at least one token; got shape {tuple(x.shape)}")
        logits = self.router(tokens)
        weights, expert_ids, stats = route(logits, self.top_k, renormalize=self.renormalize, scoring=self.scoring)
        out = moe_ffn(tokens, self.w_gate_up, self.w_down, weights, expert_ids, activation=self.activation)
        balance = load_balancing_loss(logits, stats, scoring=self.scoring)
        z = z_loss(stats.router_logsumexp)
        aux = MoEAux(balance, z, stats.tokens_per_expert, self.load_balancing_coef * balance + self.z_loss_coef * z)
        return out.reshape(x.shape), aux

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, ffn={self.ffn}, experts={self.experts}, top_k={self.top_k}, "
                f"activation={self.activation!r}, scoring={self.scoring!r}, renormalize={self.renormalize}, "
                f"load_balancing_coef={self.load_balancing_coef}, z_loss_coef={self.z_loss_coef}")
