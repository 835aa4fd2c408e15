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
from typing import Tuple

import torch

from ._ext import C
from ._ops import native_op
from .reference import moe as _reference

__all__ = ["RouteStats", "route", "load_balancing_loss", "z_loss"]

SCORINGS = {"softmax": 0, "sigmoid": 1}
MAX_EXPERTS = 1024


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


load_balancing_loss = _reference.load_balancing_loss
z_loss = _reference.z_loss
