"""Quantized weights in plain PyTorch (issue 11, in progress): the formats' meaning and the products
they define.

    int4:  w[n, k] = (codes[n, k] - zeros[k // group, n]) * scales[k // group, n]     (group = K when -1)
           int4_linear(x, ...) = x @ wᵀ (+ bias), float32 from x's values, rounded once to x's dtype
    int8:  int8_matmul(a, b) = a @ bᵀ over int8 codes, exact (int64), the integer W8A8 accumulators
           w8a8_linear(xq, x_scales, wq, w_scales, bias) = int8_matmul * x_scales * w_scalesᵀ (+ bias)
"""
from __future__ import annotations

from typing import Optional

import torch


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
