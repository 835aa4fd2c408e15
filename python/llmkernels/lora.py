"""LoRA-fused matmul (csrc/lora/, docs/lora.md): IN PROGRESS (issue 13). So far one adapter with a
16-bit base weight and no dropout, forward and backward:

    out = lora_linear(x, weight, lora_a, lora_b, scale, bias=None)
        = x Wᵀ + bias + scale (x Aᵀ) Bᵀ          (llmkernels.reference.lora.lora_linear's semantics)

x (M, K), weight (N, K) frozen, lora_a (r, K) (PEFT's lora_A.weight), lora_b (N, r) (lora_B.weight).
Two launches: the shrink s = scale x Aᵀ (rounded to x's dtype), then the base GEMM with the expand
as extra k tiles ([x | s] · [W | B]ᵀ), the bias in its epilogue, one rounding; the backward's dx the
same kernels transposed. Not yet: dropout, multi-adapter serving, fused-projection slices, int4 base
weights, LoRALinear.
"""
from typing import Optional, Tuple

import torch

from . import _validate as check
from ._ext import C
from ._ops import native_op

__all__ = ["lora_linear"]

SEGMENT = C.lora_segment()   # K and the rank are laid out in segments of this many k elements
MAX_RANK = 256


@native_op("lora_linear")
def _lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 bias: Optional[torch.Tensor], transposed: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """shrink (M, padded rank) and out (M, N) in x's dtype (out (M, K) when transposed: x is then dy
    (M, N)); the split-K workspace (float32)."""
    m = x.shape[0]
    n, k = weight.shape
    rank = lora_a.shape[0]
    in_features, out_features = (n, k) if transposed else (k, n)
    padded = (rank + SEGMENT - 1) // SEGMENT * SEGMENT
    workspace = C.lora_workspace(m, out_features, in_features, rank) if check.device_kernels(x) else 0
    return (torch.empty((m, padded), dtype=x.dtype, device=x.device),
            torch.empty((m, out_features), dtype=x.dtype, device=x.device),
            torch.empty((workspace,), dtype=torch.float32, device=x.device))


class _LoraLinear(torch.autograd.Function):
    """Forward: the kernels' shrink s = scale x Aᵀ (saved) and out = [x | s]·[W | B]ᵀ + bias. Backward,
    for dy (M, N): the transposed kernels give u = scale dy B and dx = dy W + u A in one fused product;
    dA = uᵀ x and dB = dyᵀ s (rank-sized products, torch.matmul), d bias = the column sums of dy."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scale):
        shrink, out, _ = _lora_linear(x, weight, lora_a, lora_b, scale, None if bias is None else bias.float(), False)
        ctx.save_for_backward(x, weight, lora_a, lora_b, shrink)
        ctx.scale, ctx.bias_dtype = scale, None if bias is None else bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, shrink = ctx.saved_tensors
        need_x, _, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dy = check.rows_aligned(dy.to(x.dtype))
        rank = lora_a.shape[0]   # (padded to 8 by lora_linear: the padding's gradients are dropped by its pad)
        dx = d_a = d_b = d_bias = None
        if need_x:
            u, dx, _ = _lora_linear(dy, weight, lora_a, lora_b, ctx.scale, None, True)
            u = u[:, :rank]
        elif need_a:
            u = (dy @ lora_b[:, :rank]) * ctx.scale
        if need_a:
            d_a = (u.T @ x).to(x.dtype)
        if need_b:
            d_b = (dy.T @ shrink[:, :rank]).to(x.dtype)
        if need_bias:
            d_bias = dy.float().sum(dim=0).to(ctx.bias_dtype)
        return dx, None, d_a, d_b, d_bias, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One adapter's LoRA linear: x (M, K) bf16/fp16 (float32 on CPU tensors), weight (N, K) frozen,
    lora_a (r, K), lora_b (N, r) of x's dtype, 1 <= r <= 256, N and K multiples of 8, bias (N)
    optional -> (M, N) in x's dtype. Differentiable with respect to x, lora_a, lora_b and bias
    (_LoraLinear); the weight must not require grad (it is frozen)."""
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor; got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}; got {t.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad: LoRA's base weight is frozen (weight.requires_grad_(False))")
    rank = lora_a.shape[0]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"lora_a must have 1 to {MAX_RANK} rows (the rank); got {tuple(lora_a.shape)}")
    if lora_a.shape[1] != x.shape[1] or tuple(weight.shape[1:]) != (x.shape[1],):
        raise ValueError(f"weight (N, K) and lora_a (r, K) must have x's K = {x.shape[1]} columns; got "
                         f"{tuple(weight.shape)} and {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (weight.shape[0], rank):
        raise ValueError(f"lora_b must be (N, r) = ({weight.shape[0]}, {rank}) (weight's rows, lora_a's rank); got "
                         f"{tuple(lora_b.shape)}")
    scale = check.float32_value(scale, "scale")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be a ({weight.shape[0]},) tensor; got {tuple(getattr(bias, 'shape', ()))}")
    if rank % 8:   # the kernels read rows of 8-element chunks: zero rank columns added (they add nothing)
        pad = 8 - rank % 8
        lora_a = torch.cat([lora_a, lora_a.new_zeros(pad, lora_a.shape[1])])
        lora_b = torch.nn.functional.pad(lora_b, (0, pad))
    return _LoraLinear.apply(check.rows_aligned(x), weight.contiguous(), lora_a.contiguous(), lora_b.contiguous(),
                             bias, scale)
