"""Flash-style attention (csrc/attention/, docs/attention.md), exported as `llmkernels.attention` and
`llmkernels.attention_varlen` (flash-attn's signatures and conventions).

The ops `llmkernels::attention_forward` and `attention_backward` (torch.library custom ops with
autograd, so both functions are differentiable and traceable by torch.compile) run the CPU kernels on
CPU tensors, the CUDA kernels on CUDA tensors, and the CUDA kernels' own source under the SIMT
emulator on CPU tensors while `llmkernels.emulator.emulate()` is on. The CUDA kernels take bf16 and
fp16; the CPU kernels also fp32. This module is private: import the two functions from the package.
"""
import math
from typing import Optional, Tuple

import torch

from . import _validate as check
from ._ops import native_op

__all__ = ["attention", "attention_varlen"]


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
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse float32: (batch, heads_q, seqlen_q), or (heads_q, total_q) for varlen).
    `deterministic` is for the backward (saved by autograd)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if cu_seqlens_q is None:
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    return out, lse


@native_op("attention_backward")
def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
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
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like q, k, v, then the CUDA kernels' float32 workspaces (empty for the CPU
    kernel): delta (lse's shape) and, unless deterministic, the zero-filled dq accumulator (q's shape)
    that the key blocks add into with atomics."""
    device_kernels = check.device_kernels(q)
    workspace = lambda shape: torch.empty(shape if device_kernels else (0,), dtype=torch.float32, device=q.device)
    dq_accum = (torch.zeros(q.shape, dtype=torch.float32, device=q.device) if device_kernels and not deterministic
                else workspace((0,)))
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device), workspace(lse.shape), dq_accum)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, softcap, causal, left, right, slopes, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, slopes)
    ctx.options = (max_q, max_k, scale, softcap, causal, left, right, slopes, deterministic)


def _autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, slopes = ctx.saved_tensors
    max_q, max_k, scale, softcap, causal, left, right, _, deterministic = ctx.options
    dout = torch.zeros_like(out) if dout is None else check.rows_aligned(dout)
    dlse = None if dlse is None else dlse.contiguous()
    dq, dk, dv, _, _ = _backward(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, softcap, causal,
                                 left, right, slopes, deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("llmkernels::attention_forward", _autograd_backward, setup_context=_setup_context)


def _options(q, softmax_scale, window, softcap):
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
        raise ValueError(f"window must be a pair of ints (left, right), -1 meaning unbounded; got {window!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return scale, float(softcap), int(window[0]), int(window[1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: Optional[float] = None, window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False, return_lse: bool = False):
    """softmax(q kᵀ · scale [softcap, ALiBi, masks]) v, flash-attn's conventions (docs/attention.md).

    q (batch, seqlen_q, heads_q, head_dim), k and v (batch, seqlen_k, heads_k, head_dim) with
    heads_q % heads_k == 0; causal masks align bottom-right. Returns out (like q), and the float32
    log-sum-exp (batch, heads_q, seqlen_q) when `return_lse`. Differentiable in q, k and v. The CUDA
    backward adds dq with float atomics unless `deterministic` (bit-reproducible, somewhat slower);
    the CPU backward is deterministic either way."""
    scale, softcap, left, right = _options(q, softmax_scale, window, softcap)
    q, k, v = check.rows_aligned(q), check.rows_aligned(k), check.rows_aligned(v)
    out, lse = _forward(q, k, v, None, None, 0, 0, scale, softcap, bool(causal), left, right, alibi_slopes,
                        bool(deterministic))
    return (out, lse) if return_lse else out


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     softmax_scale: Optional[float] = None, window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                     return_lse: bool = False):
    """`attention` over packed sequences: q (total_q, heads_q, head_dim), k and v (total_k, heads_k,
    head_dim), int32 cumulative lengths cu_seqlens_q/k of batch + 1 entries (sequences may be empty).
    The log-sum-exp is (heads_q, total_q)."""
    scale, softcap, left, right = _options(q, softmax_scale, window, softcap)
    q, k, v = check.rows_aligned(q), check.rows_aligned(k), check.rows_aligned(v)
    out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, softcap,
                        bool(causal), left, right, alibi_slopes, bool(deterministic))
    return (out, lse) if return_lse else out


def forward(q, k, v, *, causal=False, softmax_scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
            deterministic=False, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """(out, lse) of attention or attention_varlen (the tests' entry to both layouts)."""
    if cu_seqlens_q is None:
        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                         alibi_slopes=alibi_slopes, deterministic=deterministic, return_lse=True)
    return attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                            softmax_scale=softmax_scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                            deterministic=deterministic, return_lse=True)
