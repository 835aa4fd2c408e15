"""LoRA in plain PyTorch: the LoRA-fused linear layer (PEFT's semantics), its dropout mask, and
merging an adapter into the base weight.

    lora_linear(x (M, K), weight (N, K), lora_a, lora_b, scale) -> (M, N)
        y = x Wᵀ + bias + scale * (dropout(x) Aᵀ) Bᵀ
    dropout_keep(seed, rows, cols, p) -> bool (rows, cols)     the mask, from Philox4x32-10
    merge(weight, lora_a, lora_b, scale) = weight + scale B A,  unmerge = weight - scale B A
    scaling(alpha, rank, rslora=False) = alpha / rank, or alpha / sqrt(rank) (rsLoRA)

Conventions, the same in every function:

- M rows (tokens), K in_features, N out_features, r the LoRA rank. Weights are laid out like
  nn.Linear's, (out_features, in_features): weight (N, K), lora_a (r, K) (PEFT's lora_A.weight),
  lora_b (N, r) (lora_B.weight). x is 2-D (M, K): callers flatten leading dimensions.
- Multi-adapter serving (adapter_ids given): L adapters stacked, lora_a (L, r, K), lora_b (L, N, r),
  row m uses adapter adapter_ids[m], -1 meaning none (the base output only). Ranks may differ per
  adapter: r is the padded rank r_max and adapter l uses only lora_a[l, :ranks[l]] and
  lora_b[l, :, :ranks[l]] (for every slice); the padding is never read (NaN there changes nothing).
- Fused projections (slices given): one weight for S stacked projections (QKV, gate/up), output
  columns [off_s, off_s + n_s) with off_s = n_0 + ... + n_{s-1} belong to slice s, which has its
  own lora_a[s] and its own scale; lora_b (N, r) stacks the slices' B matrices along N like weight.
  With adapters too: lora_a (L, S, r, K), lora_b (L, N, r), scale (L, S) or one number.
- The dropout of LoRA's input is one mask (dropout_keep(seed, M, K, p)) over x's rows and columns,
  shared by every slice and adapter; the base product uses x itself (as in PEFT). Element (m, k) is
  kept iff Philox4x32-10 word (i mod 4) of counter (i div 4 low word, high word, 0x4C6F5241, 0) under
  key (seed low word, high word) is >= min(floor(p 2^32), 2^32 - 1), i = m K + k; kept elements are
  multiplied by 1 / (1 - p).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..quant import Int4Weight
from .quant import dequantize_int4

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MASK32 = 0xFFFFFFFF
LORA_STREAM = 0x4C6F5241          # "LoRA": counter word c2 of the dropout mask (MeZO's holds a tensor index)


# -- the dropout mask ----------------------------------------------------------------------------

def _mul_hi_lo(multiplier: int, value: torch.Tensor):
    """(high, low) 32-bit words of multiplier * value, both < 2^32, without int64 overflow: the
    product is assembled from value's two 16-bit halves (each partial product < 2^48)."""
    low_part = multiplier * (value & 0xFFFF)
    high_part = multiplier * (value >> 16)
    middle = low_part + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (middle >> 32), middle & _MASK32


def philox4x32_10(c0, c1, c2, c3, key0: int, key1: int):
    """Philox4x32-10 (csrc/common/philox.h) on int64 tensors holding 32-bit words: the counter
    (c0, c1, c2, c3) (tensors or ints, broadcast) under the key (key0, key1) -> 4 int64 tensors in
    [0, 2^32)."""
    device = next((w.device for w in (c0, c1, c2, c3) if isinstance(w, torch.Tensor)), None)
    c = [w & _MASK32 for w in torch.broadcast_tensors(*(torch.as_tensor(w, dtype=torch.int64, device=device)
                                                         for w in (c0, c1, c2, c3)))]
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(0xD2511F53, c[0])
        hi1, lo1 = _mul_hi_lo(0xCD9E8D57, c[2])
        c = [hi1 ^ c[1] ^ key0, lo1, hi0 ^ c[3] ^ key1, lo0]
        key0, key1 = (key0 + 0x9E3779B9) & _MASK32, (key1 + 0xBB67AE85) & _MASK32
    return c


def _seed_value(seed) -> int:
    """A 64-bit pattern: an int in [-2^63, 2^64) or a one-element integer tensor, modulo 2^64 (so -1
    and 2^64 - 1 are one seed, as in llmkernels.mezo)."""
    if isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point() \
            and seed.dtype != torch.bool:
        seed = int(seed.item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or a one-element integer tensor; got {type(seed).__name__}")
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [-2**63, 2**64); got {seed}")
    return int(seed) % 2**64


def random_words(seed, start: int, count: int, device=None) -> torch.Tensor:
    """The 32-bit random words (int64 in [0, 2^32)) of the linear indices [start, start + count):
    index i gets word i % 4 of Philox4x32-10 with counter (g mod 2^32, g >> 32, LORA_STREAM, 0),
    g = i // 4, and key (seed mod 2^32, seed >> 32) (the seed's 64-bit pattern itself, not mixed)."""
    seed = _seed_value(seed)
    group = torch.arange(start // 4, (start + count + 3) // 4, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32_10(group & _MASK32, group >> 32, LORA_STREAM, 0, seed & _MASK32, seed >> 32), 1)
    return words.reshape(-1)[start % 4:start % 4 + count]


def dropout_threshold(p: float) -> int:
    """min(floor(p * 2^32), 2^32 - 1) from p as a float64 (exact: a product by a power of two). A
    kernel computes it on the host in double: p rounded to float32 first can move it (0.1 -> +1)."""
    return min(math.floor(float(p) * 2**32), 2**32 - 1)


def _check_p(p) -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1); got {p!r}")


def dropout_keep(seed, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """The keep mask (bool (rows, cols)) of dropout with probability p in [0, 1): element (m, k) is
    kept iff the word of index m * cols + k (random_words) >= dropout_threshold(p), so P(kept) = 1 - threshold /
    2^32 ~ 1 - p and p = 0 keeps everything. Kept elements are scaled by 1 / (1 - p) (lora_linear).
    Deterministic in (seed, m * cols + k): forward and backward regenerate it, nothing is stored."""
    _check_p(p)
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    return (random_words(seed, 0, rows * cols, device) >= dropout_threshold(p)).reshape(rows, cols)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scale: alpha / rank, or alpha / sqrt(rank) with rsLoRA (use_rslora=True)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# -- checks --------------------------------------------------------------------------------------

def _check_tensor(name: str, t, dims: int, dtype: Optional[torch.dtype] = None, of: str = "x") -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        got = str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor; got {got}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have {of}'s dtype ({dtype}); got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions; got shape {tuple(t.shape)}")


def _scale_table(scale, adapters: int, slices: int, multi: bool, sliced: bool):
    """scale as an adapters x slices list of Python floats (read, not differentiated)."""
    expected = (adapters,) * multi + (slices,) * sliced
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a number or a float tensor; got {scale.dtype}")
        if scale.dim() and tuple(scale.shape) != expected:
            raise ValueError(f"scale must be a number, a 0-d tensor or a tensor of shape {expected}; "
                             f"got shape {tuple(scale.shape)}")
        table = scale.detach().double().expand(expected).reshape(adapters, slices).tolist()
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        table = [[float(scale)] * slices for _ in range(adapters)]
    else:
        raise TypeError(f"scale must be a number or a float tensor; got {type(scale).__name__}")
    return table


def _check_ranks(ranks, adapters: int, rank: int):
    if isinstance(ranks, torch.Tensor):
        if ranks.is_floating_point() or ranks.dtype == torch.bool:
            raise TypeError(f"ranks must hold integers; got {ranks.dtype}")
        ranks = ranks.tolist()
    ranks = list(ranks)
    if len(ranks) != adapters or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in ranks):
        raise ValueError(f"ranks must be {adapters} ints (one per adapter); got {ranks!r}")
    if any(not 0 <= v <= rank for v in ranks):
        raise ValueError(f"ranks must lie in [0, {rank}] (lora_a's padded rank); got {ranks}")
    return [int(v) for v in ranks]


# -- the fused linear layer ----------------------------------------------------------------------

def lora_linear(x: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scale, *,
                bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, seed=None,
                adapter_ids: Optional[torch.Tensor] = None, ranks=None, slices: Optional[Sequence[int]] = None,
                upcast: bool = True, compute_dtype: Optional[torch.dtype] = None,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = x Wᵀ + bias + scale * (dropout(x) Aᵀ) Bᵀ, (M, N) (module docstring for the layouts).

    x (M, K) float16, bfloat16, float32 or float64; weight (N, K) of x's dtype, or an Int4Weight
    (llmkernels.quant.quantize_int4: QLoRA), used as its float32 dequantization (q - z) * s;
    bias (N,) of x's dtype or None. lora_a and lora_b have x's dtype; their shapes and scale's:

        adapter_ids  slices   lora_a         lora_b       scale
        None         None     (r, K)         (N, r)       number
        (M,)         None     (L, r, K)      (L, N, r)    number or (L,)
        None         (n_s)    (S, r, K)      (N, r)       number or (S,)
        (M,)         (n_s)    (L, S, r, K)   (L, N, r)    number or (L, S)

    A 0-d tensor counts as a number. scale's values are read as Python floats (not differentiated).
    adapter_ids: int32 or int64 (M,) in [-1, L), -1 = no adapter. ranks (only with adapter_ids): L
    ints in [0, r], default r for every adapter; adapter l reads lora_a[l, ..., :ranks[l], :] and
    lora_b[l, :, :ranks[l]] only. slices: S positive ints summing to N; slice s owns output columns
    [n_0 + ... + n_{s-1}, ... + n_s) and adds scale_s * (dropout(x) A_sᵀ) B[those rows of lora_b]ᵀ.
    dropout_p in [0, 1); > 0 needs a seed (an int in [-2^63, 2^64) or a one-element integer tensor):
    dropout(x) = x * dropout_keep(seed, M, K, dropout_p) * (1 / (1 - dropout_p)), 1 / (1 - p) a float64
    rounded to the arithmetic's dtype. The base term uses x without dropout.

    upcast=True: every operation (dequantization, both LoRA products, the scale, bias and sum) in
      compute_dtype (float32 by default, float64 for float64 x; torch.float64 gives a float64 oracle
      of 16-bit inputs) from the inputs' values, rounded once to out_dtype (default x's dtype).
    upcast=False: what a PEFT user computes, the parity rule's baseline: F.linear(x, W, bias) in x's
      dtype (an Int4Weight dequantized and rounded to x's dtype first), then + F.linear(F.linear(
      dropout(x), A), B) * scale, each matmul in x's dtype, dropout and the scale as x times a Python
      float (one rounding each), per adapter on the rows gathered for it. compute_dtype must be None.
    Differentiable with respect to x, lora_a, lora_b and bias (plain torch ops); the padding beyond
    an adapter's rank and adapters no row uses get zero gradients.
    """
    _check_tensor("x", x, 2)
    dtype, (rows, k) = x.dtype, x.shape
    multi, sliced = adapter_ids is not None, slices is not None
    if isinstance(weight, Int4Weight):
        n, weight_k = weight.shape
        weight_tensors = [weight.packed, weight.scales, weight.zeros]
    else:
        _check_tensor("weight", weight, 2, dtype)
        n, weight_k = weight.shape
        weight_tensors = [weight]
    if weight_k != k:
        raise ValueError(f"weight must have shape (out_features, in_features={k}) (x's columns); "
                         f"got {(n, weight_k)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, dtype)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},) (the weight's out_features); got {tuple(bias.shape)}")
    _check_tensor("lora_a", lora_a, 2 + multi + sliced, dtype)
    _check_tensor("lora_b", lora_b, 2 + multi, dtype)
    rank = lora_a.shape[-2]
    if lora_a.shape[-1] != k:
        raise ValueError(f"lora_a's last dimension must be in_features {k}; got shape {tuple(lora_a.shape)}")
    if lora_b.shape[-2:] != (n, rank):
        raise ValueError(f"lora_b must end in (out_features={n}, rank={rank}) (rank from lora_a "
                         f"{tuple(lora_a.shape)}); got shape {tuple(lora_b.shape)}")
    named = [("x", x), ("weight", weight_tensors[0]), ("lora_a", lora_a), ("lora_b", lora_b)]
    named += [(name, t) for name, t in (("bias", bias), ("adapter_ids", adapter_ids), ("scale", scale))
              if isinstance(t, torch.Tensor) and t.dim() > 0] + [("weight", t) for t in weight_tensors[1:]]
    if len({t.device for _, t in named}) != 1:
        raise RuntimeError("x, weight, lora_a, lora_b, bias, adapter_ids and scale must be on one device; got "
                           + ", ".join(f"{name} on {t.device}" for name, t in named))
    adapters = lora_a.shape[0] if multi else 1
    if multi and lora_b.shape[0] != adapters:
        raise ValueError(f"lora_a and lora_b must have one number of adapters; got {adapters} (lora_a "
                         f"{tuple(lora_a.shape)}) and {lora_b.shape[0]} (lora_b {tuple(lora_b.shape)})")
    if sliced:
        slices = tuple(slices)
        if not slices or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in slices) \
                or sum(slices) != n:
            raise ValueError(f"slices must be positive ints summing to out_features {n}; got {slices!r}")
        if lora_a.shape[-3] != len(slices):
            raise ValueError(f"lora_a must have {len(slices)} slices (len(slices)) in dimension {int(multi)}; "
                             f"got shape {tuple(lora_a.shape)}")
    else:
        slices = (n,)
    scales = _scale_table(scale, adapters, len(slices), multi, sliced)
    if multi:
        if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in (torch.int32, torch.int64):
            got = adapter_ids.dtype if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__
            raise TypeError(f"adapter_ids must be an int32 or int64 tensor; got {got}")
        if tuple(adapter_ids.shape) != (rows,):
            raise ValueError(f"adapter_ids must have shape ({rows},) (one per row of x); "
                             f"got {tuple(adapter_ids.shape)}")
        if rows and not (-1 <= adapter_ids.min().item() and adapter_ids.max().item() < adapters):
            raise ValueError(f"adapter_ids must lie in [-1, {adapters}) (L = {adapters} adapters, -1 = none); got "
                             f"values from {adapter_ids.min().item()} to {adapter_ids.max().item()}")
        ranks = [rank] * adapters if ranks is None else _check_ranks(ranks, adapters, rank)
        ids = adapter_ids.long()
    else:
        if ranks is not None:
            raise ValueError("ranks needs adapter_ids (a single adapter uses all of lora_a's rows)")
        ranks, ids = [rank], torch.zeros(rows, dtype=torch.int64, device=x.device)
        lora_a, lora_b = lora_a[None], lora_b[None]
    if not sliced:
        lora_a = lora_a.unsqueeze(1)                                          # (L, S = 1, r, K)
    _check_p(dropout_p)
    if seed is not None:
        _seed_value(seed)
    if dropout_p > 0 and seed is None:
        raise ValueError(f"dropout_p = {dropout_p} needs a seed (an int) for its mask")
    if not upcast and compute_dtype is not None:
        raise ValueError(f"compute_dtype must be None with upcast=False (which computes in x's dtype); "
                         f"got {compute_dtype}")
    if compute_dtype is None:
        compute_dtype = (torch.float64 if dtype == torch.float64 else torch.float32) if upcast else dtype
    elif compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float32 or torch.float64; got {compute_dtype}")

    if isinstance(weight, Int4Weight):
        weight = dequantize_int4(weight.codes(), weight.scales, weight.zeros, weight.group_size)
    xc, w, a, b = (t.to(compute_dtype) for t in (x, weight, lora_a, lora_b))
    base = F.linear(xc, w, None if bias is None else bias.to(compute_dtype))
    dropped = xc
    if dropout_p > 0:
        dropped = xc * dropout_keep(seed, rows, k, dropout_p, device=x.device) * (1.0 / (1.0 - dropout_p))
    delta = torch.zeros(rows, n, dtype=compute_dtype, device=x.device)
    for adapter in range(adapters):
        token = (ids == adapter).nonzero().reshape(-1)
        if token.numel() == 0:
            continue
        r_l, x_l, parts, start = ranks[adapter], dropped[token], [], 0
        for s, width in enumerate(slices):
            h = F.linear(x_l, a[adapter, s, :r_l])                            # (M_l, r_l)
            parts.append(F.linear(h, b[adapter, start:start + width, :r_l]) * scales[adapter][s])
            start += width
        delta = delta.index_add(0, token, torch.cat(parts, dim=1))
    return (base + delta).to(out_dtype or dtype)


# -- merging -------------------------------------------------------------------------------------

def _check_merge(weight, lora_a, lora_b, scale) -> None:
    if isinstance(weight, Int4Weight):
        raise TypeError("weight must be a float tensor: an Int4Weight cannot absorb an adapter exactly "
                        "(dequantize it first)")
    _check_tensor("weight", weight, 2)
    _check_tensor("lora_a", lora_a, 2, weight.dtype, "weight")
    _check_tensor("lora_b", lora_b, 2, weight.dtype, "weight")
    n, k = weight.shape
    rank = lora_a.shape[0]
    if lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape (rank, in_features={k}); got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n, rank):
        raise ValueError(f"lora_b must have shape (out_features={n}, rank={rank}) (rank from lora_a); "
                         f"got {tuple(lora_b.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a number; got {type(scale).__name__}")
    if len({weight.device, lora_a.device, lora_b.device}) != 1:
        raise RuntimeError(f"weight, lora_a and lora_b must be on one device; got {weight.device}, "
                           f"{lora_a.device} and {lora_b.device}")


def _delta(weight, lora_a, lora_b, scale):
    """(compute dtype, scale * lora_b @ lora_a in it)."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return compute, float(scale) * (lora_b.to(compute) @ lora_a.to(compute))


def merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """weight + scale * lora_b @ lora_a, (N, K), in float32 (float64 for a float64 weight), rounded
    once to weight's dtype: x @ merge(...)ᵀ is lora_linear without dropout, up to that rounding.
    unmerge(merge(w)) gives back w only up to rounding: merge rounds w + d to w's dtype, and the
    exact w is then the float32 value (merged - d) off by that rounding error e, so the restored
    element is within 2|e| <= one unit in the last place of the merged element of w."""
    _check_merge(weight, lora_a, lora_b, scale)
    compute, delta = _delta(weight, lora_a, lora_b, scale)
    return (weight.to(compute) + delta).to(weight.dtype)


def unmerge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """weight - scale * lora_b @ lora_a, the inverse of merge (its docstring: up to rounding)."""
    _check_merge(weight, lora_a, lora_b, scale)
    compute, delta = _delta(weight, lora_a, lora_b, scale)
    return (weight.to(compute) - delta).to(weight.dtype)
