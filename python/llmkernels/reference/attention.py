"""Attention (flash-attn's conventions) in plain PyTorch: the score matrix materialized.

S = (q kᵀ) * scale, then softcap * tanh(S / softcap) when softcap > 0, then the ALiBi bias
-slope[h] * |i + seqlen_k - seqlen_q - j|; masks align bottom-right (query i sits at key position
i + seqlen_k - seqlen_q): causal keeps j <= that position, window (left, right) keeps
position - left <= j <= position + right (-1: unbounded on that side; causal means right = 0).
P = softmax over the kept keys, out = P v. Arithmetic in float32 (float64 for float64 inputs),
rounded once to q's dtype; with `upcast=False`, 16-bit inputs are computed in their own dtype
throughout (PyTorch's own low-precision attention: the baseline of the parity rule for kernels that
round P and dS to 16 bits for the tensor cores, as flash-attn's tests do). GQA: query head h reads kv head h // (heads_q // heads_k).
A query row that keeps no key gives out = 0 and lse = +inf (so exp(S - lse) = 0 in a backward).
The lse is float32 (float64 for float64 inputs, so that the reference stays a float64 oracle).
Differentiable by torch autograd; `deterministic` is accepted and ignored.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(q, k, v, window, softcap, alibi_slopes, batch, dims):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor; got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions; got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or (dims == 4 and q.shape[0] != k.shape[0]):
        raise ValueError(f"q and k must agree in batch and head_dim; got {tuple(q.shape)} and {tuple(k.shape)}")
    heads_q, heads_k = q.shape[-2], k.shape[-2]
    if heads_k == 0 or heads_q % heads_k != 0:
        raise ValueError(f"heads of q ({heads_q}) must be a multiple of heads of k and v ({heads_k})")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window)):
        raise ValueError(f"window must be a pair of integers >= -1; got {window!r}")
    if not softcap >= 0:
        raise ValueError(f"softcap must be >= 0; got {softcap}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be a float32 tensor; got {getattr(alibi_slopes, 'dtype', alibi_slopes)}")
        if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
            raise ValueError(f"alibi_slopes must have shape ({heads_q},) or ({batch}, {heads_q}); "
                             f"got {tuple(alibi_slopes.shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: Optional[float] = None, window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False, return_lse: bool = False,
              upcast: bool = True):
    _check(q, k, v, window, softcap, alibi_slopes, q.shape[0] if q.dim() == 4 else 0, 4)
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32 if upcast else q.dtype
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    group = heads_q // heads_k
    kc = k.to(compute).repeat_interleave(group, dim=2)
    vc = v.to(compute).repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.to(compute), kc) * scale          # (batch, heads_q, sq, sk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)  # key position of query i
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute).reshape(-1, heads_q, 1, 1)
        s = s - slopes * (pos - j).abs().to(compute)
    left, right = window
    if causal:
        right = 0
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        keep &= j >= pos - left
    if right >= 0:
        keep &= j <= pos + right
    row_ok = keep.any(dim=1)[:, None]                                        # (sq, 1): keeps some key
    # Rows that keep no key are softmaxed over zeros (finite, so no NaN in any gradient), then
    # zeroed; their lse becomes +inf.
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~row_ok, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(~keep, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", p, vc).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.logsumexp(s, dim=-1).masked_fill(~row_ok[:, 0], float("inf"))
    return out, lse if lse.dtype == torch.float64 else lse.float()


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     softmax_scale: Optional[float] = None, window: Tuple[int, int] = (-1, -1),
                     softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                     deterministic: bool = False, return_lse: bool = False, upcast: bool = True):
    """Packed sequences: q (total_q, heads_q, head_dim), k and v (total_k, heads_k, head_dim),
    sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]. Returns out (total_q, heads_q, head_dim)
    and, when asked, lse (heads_q, total_q)."""
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0] if q.dim() == 3 else None),
                            ("cu_seqlens_k", cu_seqlens_k, k.shape[0] if k.dim() == 3 else None)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor; got {getattr(cu, 'dtype', type(cu).__name__)}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must have shape (batch + 1,); got {tuple(cu.shape)}")
        c = cu.tolist()
        if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or (total is not None and c[-1] != total):
            raise ValueError(f"{name} must rise from 0 to the number of packed tokens ({total}); got {c}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one length; got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    batch = cu_seqlens_q.numel() - 1
    _check(q, k, v, window, softcap, alibi_slopes, batch, 3)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for name, c, limit in (("max_seqlen_q", cq, max_seqlen_q), ("max_seqlen_k", ck, max_seqlen_k)):
        longest = max((b - a for a, b in zip(c, c[1:])), default=0)
        if longest > limit:
            raise ValueError(f"{name} ({limit}) is below the longest sequence ({longest})")
    heads_q, head_dim = q.shape[1], q.shape[2]
    outs = [q.new_zeros(0, heads_q, head_dim)]
    lses = [torch.zeros(heads_q, 0, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                        device=q.device)]
    for b in range(batch):
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                             causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                             alibi_slopes=slopes, return_lse=True, upcast=upcast)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs)
    return (out, torch.cat(lses, dim=1)) if return_lse else out
