"""The GEMM core (llmkernels._gemm.gemm) in plain PyTorch, in float64 from the inputs.

Rows gathered by indexing, the product and the epilogue of csrc/gemm/gemm.h in float64, one
rounding to the output dtype at the end. `out_dtype=torch.float64` returns the unrounded result
(the tests' oracle).
"""
from __future__ import annotations

from typing import Optional

import torch


def gemm(x: torch.Tensor, weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
         row_scale: Optional[torch.Tensor] = None, col_scale: Optional[torch.Tensor] = None,
         activation: str = "none", accumulate_into: Optional[torch.Tensor] = None,
         rows: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    k = weight.shape[1]
    a = x[rows.long()] if rows is not None else x.reshape(-1, k)
    lead = (rows.shape[0],) if rows is not None else tuple(x.shape[:-1])
    v = a.double() @ weight.double().T
    if row_scale is not None:
        v = v * row_scale.double()[:, None]
    if col_scale is not None:
        v = v * col_scale.double()
    if bias is not None:
        v = v + bias.double()
    if activation == "silu":
        v = torch.nn.functional.silu(v)
    elif activation == "gelu":
        v = torch.nn.functional.gelu(v)                     # the erf form
    elif activation == "swiglu":
        v = torch.nn.functional.silu(v[:, 0::2]) * v[:, 1::2]   # columns are (gate, up) pairs
    elif activation != "none":
        raise ValueError(f"unknown activation {activation!r}")
    v = v.reshape(*lead, v.shape[-1])
    if accumulate_into is not None:
        accumulate_into.copy_((accumulate_into.double() + v).to(accumulate_into.dtype))
        return accumulate_into
    return v.to(out_dtype or x.dtype)
