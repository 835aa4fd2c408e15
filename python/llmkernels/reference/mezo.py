"""The MeZO algorithm as the paper writes it, in plain PyTorch, on top of `llmkernels.mezo.noise`.

One tensor at a time, z materialized, arithmetic in float32, result rounded once to the parameter
dtype. `step` is the paper's Algorithm 1: four sweeps (perturb +eps, -2eps, +eps, update).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from ..mezo import noise


def _z(seed, index: int, p: torch.Tensor) -> torch.Tensor:
    return noise(seed, index, p.numel(), device=p.device).view(p.shape)


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], seed, scale: float) -> None:
    for i, p in enumerate(params):
        p.copy_((p.float() + scale * _z(seed, i, p)).to(p.dtype))


@torch.no_grad()
def update_(params: Sequence[torch.Tensor], seed, lr: float, projected_grad, eps: float,
            weight_decay: float = 0.0, no_decay: Optional[Iterable[torch.Tensor]] = None, *,
            next_seed=None, next_scale: Optional[float] = None) -> None:
    skip = [id(t) for t in (no_decay or [])]
    g = projected_grad.float() if isinstance(projected_grad, torch.Tensor) else float(projected_grad)
    for i, p in enumerate(params):
        z = _z(seed, i, p)
        theta = p.float() + eps * z                          # restore
        wd = 0.0 if id(p) in skip else weight_decay
        theta = theta - lr * (g * z + wd * theta)            # SGD step with decoupled weight decay
        if next_seed is not None:
            theta = theta + (eps if next_scale is None else next_scale) * _z(next_seed, i, p)
        p.copy_(theta.to(p.dtype))


@torch.no_grad()
def step(params: Sequence[torch.Tensor], closure: Callable[[], torch.Tensor], seed, lr: float, eps: float,
         weight_decay: float = 0.0) -> torch.Tensor:
    """One MeZO-SGD step (Algorithm 1 of Malladi et al.): returns the loss at theta + eps z."""
    perturb_(params, seed, eps)
    loss_pos = closure()
    perturb_(params, seed, -2 * eps)
    loss_neg = closure()
    perturb_(params, seed, eps)
    g = (loss_pos - loss_neg) / (2 * eps)
    for i, p in enumerate(params):
        z = _z(seed, i, p)
        p.copy_((p.float() - lr * (g * z + weight_decay * p.float())).to(p.dtype))
    return loss_pos
