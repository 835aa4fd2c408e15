"""Quantized weights in plain PyTorch: the formats' meaning, their quantization and the products they
define.

    quantize_int4(w, group_size, symmetric, scale_dtype) -> (codes, scales, zeros)   torch ops
    symmetric_int8(values) -> (codes, scales (rows, 1))     per-row int8: weights (per channel), tokens

    int4:  w[n, k] = (codes[n, k] - zeros[k // group, n]) * scales[k // group, n]     (group = K when -1)
           int4_linear(x, ...) = x @ wᵀ (+ bias), float32 from x's values, rounded once to x's dtype
    int8:  int8_matmul(a, b) = a @ bᵀ over int8 codes, exact (int64), the integer W8A8 accumulators
           w8a8_linear(xq, x_scales, wq, w_scales, bias) = int8_matmul * x_scales * w_scalesᵀ (+ bias)
"""
from __future__ import annotations

from typing import Optional

import torch


def _round_up_to(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scales in `dtype`, rounded up (never below the float32 value), so that the group's extreme
    values stay inside the code range."""
    rounded = scales.to(dtype)
    low = rounded.float() < scales
    return torch.where(low, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype):
    """The int4 quantization of an (N, K) weight in torch ops: codes uint8 (N, K), scales (groups, N)
    in scale_dtype, zeros uint8 (groups, N). symmetric: s = max|w| / 7, z = 8; else s = (max - min) / 15
    and z = round(-min / s) with min <= 0 <= max; s = 1 for an all-zero group, rounded up to
    scale_dtype; codes clamp(round(w / s) + z, 0, 15), the division in float64 (in float32 its
    rounding moved near-half values past the half-step bound)."""
    n, k = w.shape
    size = k if group_size == -1 else group_size
    groups = w.float().reshape(n, k // size, size)
    if symmetric:
        scale = groups.abs().amax(dim=2) / 7
    else:
        low = groups.amin(dim=2).clamp(max=0)
        high = groups.amax(dim=2).clamp(min=0)
        scale = (high - low) / 15
    scale = _round_up_to(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
    s = scale.float()
    zero = torch.full_like(s, 8) if symmetric else torch.round(-low / s).clamp(0, 15)
    codes = (torch.round(groups.double() / s.double()[:, :, None]) + zero[:, :, None]).clamp(0, 15)
    return codes.to(torch.uint8).reshape(n, k), scale.T.contiguous(), zero.to(torch.uint8).T.contiguous()


def symmetric_int8(values: torch.Tensor):
    """Row-wise symmetric int8 in torch ops: scale = max|row| / 127 in float32 (1 for an all-zero row),
    codes round-half-even(values / scale) in float64, clamped to [-127, 127]."""
    scale = values.float().abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(values.double() / scale.double()).clamp(-127, 127).to(torch.int8), scale


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes uint8 (N, K), scales (groups, N), zeros (groups, N) -> the float32 (N, K) weight."""
    n, k = codes.shape
    size = k if group_size == -1 else group_size
    group_of_column = torch.arange(k, device=codes.device) // size            # (K,)
    s = scales.float()[group_of_column].T                                       # (N, K)
    z = zeros.float()[group_of_column].T
    return (codes.float() - z) * s


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                bias: Optional[torch.Tensor] = None, upcast: bool = True) -> torch.Tensor:
    """W4A16's result: x (..., K) times the dequantized weight's transpose, plus bias, in float32
    (upcast), or what a user gets without the kernel: the dequantized weight rounded to x's dtype,
    torch.matmul in that dtype, plus bias in it (upcast=False; the baseline of the tensor-core kernel,
    which dequantizes into x's dtype)."""
    w = dequantize_int4(codes, scales, zeros, group_size)
    if not upcast:
        out = x @ w.to(x.dtype).T
        return out if bias is None else out + bias.to(x.dtype)
    out = x.float() @ w.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 times b (N, K) int8 transposed, exactly, as int64 (M, N): what W8A8's int32
    accumulators must hold (|sum| <= K * 127^2 fits int32 for K < 133 000)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul takes int8 codes; got {a.dtype} and {b.dtype}")
    return a.long() @ b.long().T


def w8a8_linear(xq: torch.Tensor, x_scales: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The W8A8 result: the exact integer product scaled by the per-token (M, 1) and per-channel (N,)
    scales, plus bias, in float64, rounded once to out_dtype."""
    out = int8_matmul(xq, wq).double() * x_scales.double() * w_scales.double()[None, :]
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)
