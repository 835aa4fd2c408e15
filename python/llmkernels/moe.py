"""Mixture-of-Experts (csrc/moe/, docs/moe.md): IN PROGRESS (issue 12). So far the router.

    weights, expert_ids, stats = route(router_logits, top_k)     one kernel: scores, top-k, weights,
                                                                 per-expert counts, router logsumexp
    load_balancing_loss(router_logits, expert_ids)               Switch Transformer's auxiliary loss
    z_loss(stats.router_logsumexp)                               ST-MoE's router z-loss

Conventions (llmkernels.reference.moe): the top-k are the k largest logits (so scores) in descending
order, equal logits to the lower expert index; weights are the selected scores (softmax over the
experts, or sigmoid), renormalized to sum to 1 by default.
"""
import dataclasses
from typing import Optional, Tuple

import torch

from . import _validate as check
from ._ext import C
from ._ops import native_op
from .reference import moe as _reference

__all__ = ["RouteStats", "route", "Permutation", "permute", "moe_ffn", "load_balancing_loss", "z_loss"]

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
    RouteStats). Not differentiable (the weights are a function of the logits, but the kernel has no
    backward yet: for a trained router use llmkernels.reference.moe.route)."""
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
    weights, ids, counts, lse = _route(logits.detach(), top_k, bool(renormalize), SCORINGS[scoring])
    return weights, ids, RouteStats(counts, lse)


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
def _grouped_gemm(a: torch.Tensor, a_rows: Optional[torch.Tensor], b: torch.Tensor, block_expert: torch.Tensor,
                  block: int, row_scale: Optional[torch.Tensor], activation: int, rows: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """out (rows, n or n / 2 for swiglu) in out_dtype, zeros where no expert's block writes."""
    n = b.shape[1] // 2 if activation == _ACTIVATION_CODES["swiglu"] else b.shape[1]
    return torch.zeros((rows, n), dtype=out_dtype, device=a.device)


def moe_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
            expert_ids: torch.Tensor, *, activation: str = "swiglu") -> torch.Tensor:
    """The routed experts' FFN (llmkernels.reference.moe.moe_ffn's semantics): x (T, H), w_gate_up
    (E, 2F, H) stacked [gate; up] for swiglu or (E, F, H) for gelu, w_down (E, H, F), routing weights
    (T, k) and expert_ids (T, k) -> (T, H) in x's dtype. No token is dropped. Forward only so far (issue
    12): the permutation (permute, blocks of BLOCK rows), a grouped GEMM with the gathered tokens and the
    activation fused (h in x's dtype), a grouped GEMM scaled by the routing weights in its epilogue
    (float32), then each token's k rows added in slot order (deterministic). No host synchronization."""
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"activation must be 'swiglu' or 'gelu'; got {activation!r}")
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down), ("weights", weights)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {getattr(t, 'dtype', type(t).__name__)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, weights)):
        raise NotImplementedError("moe_ffn's backward is not written yet (issue 12): call it under torch.no_grad(), "
                                  "or train with llmkernels.reference.moe.moe_ffn")
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
    tokens, top_k = expert_ids.shape
    perm = permute(expert_ids, experts, BLOCK)
    rows = perm.row_token.shape[0]
    real = perm.row_token >= 0
    row_weight = torch.where(real, weights.float()[perm.row_token.clamp(min=0).long(), perm.row_slot.clamp(min=0).long()],
                             torch.zeros((), device=x.device))
    h = _grouped_gemm(check.rows_aligned(x), perm.row_token, w_gate_up.contiguous(), perm.block_expert, BLOCK, None,
                      _ACTIVATION_CODES[activation], rows, x.dtype)
    y = _grouped_gemm(h, None, w_down.contiguous(), perm.block_expert, BLOCK, row_weight.contiguous(),
                      _ACTIVATION_CODES["none"], rows, torch.float32)
    out = y.index_select(0, perm.slot_row.reshape(-1).long()).reshape(tokens, top_k, hidden).sum(dim=1)
    return out.to(x.dtype)


load_balancing_loss = _reference.load_balancing_loss
z_loss = _reference.z_loss
