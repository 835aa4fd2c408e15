"""Quantized weights in plain PyTorch (issue 11, in progress): the int4 format's meaning, on unpacked
codes, and the W4A16 product it defines.

    w[n, k] = (codes[n, k] - zeros[k // group, n]) * scales[k // group, n]     (group = K when -1)
    int4_linear(x, ...) = x @ wᵀ (+ bias), in float32 from x's values, rounded once to x's dtype
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
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16's result: x (..., K) times the dequantized weight's transpose, plus bias, in float32."""
    w = dequantize_int4(codes, scales, zeros, group_size)
    out = x.float() @ w.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
