"""Flash-style attention (csrc/attention/, docs/attention.md): IN PROGRESS (issue 10).

So far: the CPU forward kernel (blocked online softmax, no materialized scores) behind the op
`llmkernels::attention_forward`, checked against `llmkernels.reference.attention`. Not yet: the
backward, autograd, the CUDA kernels (and so the emulated backend), and the public
`llmkernels.attention` / `attention_varlen` API, which this module will export once they exist.
"""

import math
from typing import Optional, Tuple

import torch

from ._ops import native_op


@native_op("attention_forward")
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    softcap: float,
    causal: bool,
    window_left: int,
    window_right: int,
    alibi_slopes: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse float32: (batch, heads_q, seqlen_q), or (heads_q, total_q) for varlen)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if cu_seqlens_q is None:
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    return out, lse


def forward(q, k, v, *, causal=False, softmax_scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """(out, lse) of attention, forward only (reference semantics: llmkernels.reference.attention)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale,
                    float(softcap), bool(causal), int(window[0]), int(window[1]), alibi_slopes)
