"""LoRA-fused matmul (csrc/lora/, docs/lora.md): one adapter for training, multi-adapter serving,
fused-projection slices, 16-bit or int4 base weights.

    out = lora_linear(x, weight, lora_a, lora_b, scale, bias=None, dropout_p=0.0, seed=None,
                      adapter_ids=None, ranks=None, slices=None, check_ids=True)
        = x Wᵀ + bias + scale (dropout(x) Aᵀ) Bᵀ   (llmkernels.reference.lora.lora_linear's semantics)

x (M, K), weight (N, K) frozen or an llmkernels.quant.Int4Weight, lora_a (r, K) (PEFT's
lora_A.weight), lora_b (N, r) (lora_B.weight); stacked per adapter and slice for serving (lora_linear's
docstring). Up to three launches: the adapter lists of the row tiles (with adapter ids), the shrink s =
scale x Aᵀ per row's adapter (rounded to x's dtype), then the base GEMM with each (adapter, slice)
group's expand as extra k tiles, the bias in its epilogue, one rounding; the backward's dx the same
kernels transposed; LoRA's input dropout (the reference's Philox mask, regenerated in the backward).

The layer (PEFT's LoraLayer for an nn.Linear, one adapter):

    layer = LoRALinear(base, r, alpha, rslora=False)    wraps a frozen nn.Linear; lora_linear in forward
    layer.merge() / layer.unmerge()                      scale B A into / out of the base weight, in place
    model = add_lora_(model, ["q_proj", "v_proj"], r, alpha)   wraps the named Linears, freezes the rest
    peft_state_dict(model) / load_peft_state_dict(model, sd)   to / from PEFT's key names

State-dict keys: a LoRALinear holds base_layer (the nn.Linear), lora_A = nn.Linear(in, r, bias=False)
and lora_B = nn.Linear(r, out, bias=False), so its keys are base_layer.weight, base_layer.bias,
lora_A.weight and lora_B.weight: PEFT's saved-adapter keys (adapter_model.safetensors, where PEFT
strips the adapter name). PEFT's in-memory model names the adapter too (lora_A.default.weight, an
nn.ModuleDict per adapter) and a PeftModel prefixes base_model.model.; peft_state_dict and
load_peft_state_dict convert.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch

from . import _validate as check
from . import quant
from ._ext import C
from ._ops import native_op

__all__ = ["lora_linear", "LoRALinear", "add_lora_", "peft_state_dict", "load_peft_state_dict"]

MAX_RANK = 256
MAX_SLICES = 8
SORTED_ROWS = 64   # multi-adapter calls with more rows run in an order sorted by adapter (CUDA kernels)


@native_op("lora_linear")
def _lora_linear(x: torch.Tensor, x_lora: Optional[torch.Tensor], weight: torch.Tensor, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float, scales: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 adapter_ids: Optional[torch.Tensor], row_order: Optional[torch.Tensor],
                 ranks: Optional[torch.Tensor], slices: List[int],
                 w_scales: Optional[torch.Tensor], w_zeros: Optional[torch.Tensor], group_size: int,
                 transposed: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """lora_a (L, S, r, K), lora_b (L, N, r) -> shrink (M, S r) and out (M, N) in x's dtype (out (M, K)
    when transposed: x is then dy (M, N)); the split-K workspace (float32) and the adapter lists
    (int32) of the CUDA kernels. x_lora: the shrink's input instead of x (dropout(x)). With w_scales
    (an int4 base, forward only): weight is the Int4Weight's packed codes, w_zeros and group_size its.
    row_order (with adapter_ids): the kernels' row r is x's row row_order[r], adapter_ids in that order
    (csrc/lora/lora.h); shrink's rows are then in that order."""
    m = x.shape[0]
    n, k = (weight.shape[0] * 8, x.shape[1]) if w_scales is not None else weight.shape
    adapters, n_slices, rank = lora_a.shape[:3]
    in_features, out_features = (n, k) if transposed else (k, n)
    multi = adapter_ids is not None
    device = check.device_kernels(x)
    workspace = C.lora_workspace(m, out_features, in_features, rank, adapters, n_slices, multi) if device else 0
    tiles = C.lora_tiles(m, adapters, multi) if device else 0
    return (torch.empty((m, n_slices * rank), dtype=x.dtype, device=x.device),
            torch.empty((m, out_features), dtype=x.dtype, device=x.device),
            torch.empty((workspace,), dtype=torch.float32, device=x.device),
            torch.empty((tiles,), dtype=torch.int32, device=x.device))


@native_op("lora_dropout")
def _dropout_op(x: torch.Tensor, seed: int, threshold: int, keep_scale: float) -> torch.Tensor:
    """x * keep / (1 - p), the mask of llmkernels.reference.lora.dropout_keep (csrc/lora/lora.h)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _dropout(x: torch.Tensor, dropout) -> torch.Tensor:
    """dropout = (seed, threshold, keep_scale)."""
    return _dropout_op(x, *dropout)


class _LoraLinear(torch.autograd.Function):
    """One adapter, S >= 1 slices: lora_a (1, S, r, K), lora_b (1, N, r), scales (1, S) float32 or None
    (then `scale` for every slice).

    Forward: the kernels' shrink s = scale dropout(x) Aᵀ (saved) and out = x Wᵀ + s Bᵀ + bias (slice
    by slice). Backward, for dy (M, N): with one slice and no dropout, the transposed kernels give u =
    scale dy B and dx = dy W + u A in one fused product; otherwise the transposed kernels give dy W and
    u (M, S r) = the slices' scale dy[:, slice] B[slice] are added as dropout(u A) (the same mask,
    regenerated). dA = uᵀ dropout(x) (regenerated, never stored) and dB = dy[:, slice]ᵀ s[:, slice]
    (rank-sized products, torch.matmul), d bias the column sums of dy."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scale, scales, slices, dropout, int4):
        x_lora = None if dropout is None else _dropout(x, dropout)
        shrink, out, _, _ = _lora_linear(x, x_lora, weight, lora_a, lora_b, scale, scales,
                                         None if bias is None else bias.float(), None, None, None, slices,
                                         *_int4_args(int4), False)
        ctx.save_for_backward(x, weight, lora_a, lora_b, shrink, scales)
        ctx.scale, ctx.slices, ctx.dropout, ctx.int4 = scale, slices, dropout, int4
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, shrink, scales = ctx.saved_tensors
        need_x, _, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        if need_x and ctx.int4 is not None:   # (dx's transposed product takes a 16-bit weight)
            weight = quant.dequantize(ctx.int4, x.dtype)
        dy = check.rows_aligned(dy.to(x.dtype))
        _, n_slices, rank, k = lora_a.shape   # (rank padded to 8 by lora_linear: its pad drops the padding's gradients)
        fused = n_slices == 1 and ctx.dropout is None and scales is None
        dx = d_a = d_b = d_bias = u = None
        if need_x and fused:
            u, dx, _, _ = _lora_linear(dy, None, weight, lora_a, lora_b, ctx.scale, None, None, None, None, None,
                                       [weight.shape[0]], None, None, 0, True)
        elif need_x or need_a:   # u (M, S r): the slices' scale dy[:, slice] B[slice rows]
            parts, start = [], 0
            for s, width in enumerate(ctx.slices):
                part = dy[:, start:start + width] @ lora_b[0, start:start + width]
                parts.append(part * (ctx.scale if scales is None else scales[0, s].to(part.dtype)))
                start += width
            u = torch.cat(parts, dim=1)
        if need_x and not fused:   # dy W by the transposed kernels (scale 0: no expand), plus u A
            _, dx, _, _ = _lora_linear(dy, None, weight, lora_a[:, :1], lora_b, 0.0, None, None, None, None, None,
                                       [weight.shape[0]], None, None, 0, True)
            expand = u @ lora_a.reshape(n_slices * rank, k)
            if ctx.dropout is not None:
                expand = _dropout(expand, ctx.dropout)
            dx = (dx.float() + expand.float()).to(x.dtype)
        if need_a:
            x_lora = x if ctx.dropout is None else _dropout(x, ctx.dropout)
            d_a = (u.T @ x_lora).reshape(lora_a.shape).to(x.dtype)
        if need_b:
            parts, start = [], 0
            for s, width in enumerate(ctx.slices):
                parts.append(dy[:, start:start + width].T @ shrink[:, s * rank:(s + 1) * rank])
                start += width
            d_b = torch.cat(parts).reshape(lora_b.shape).to(x.dtype)
        if need_bias:
            d_bias = dy.float().sum(dim=0).to(ctx.bias_dtype)
        return dx, None, d_a, d_b, d_bias, None, None, None, None, None


def _int4_args(int4):
    """The native op's (w_scales, w_zeros, group_size) for an Int4Weight base, or for none."""
    return (None, None, 0) if int4 is None else (int4.scales, int4.zeros, int4.group_size)


def _scale_table(scale, adapters: int, n_slices: int, multi: bool, sliced: bool, device):
    """(scale as a float, scales (L, S) float32 on device or None): a number or a 0-d CPU tensor is one
    scale for all, read here; a 0-d device tensor (read on the device: no synchronization, CUDA-graph
    safe) or a tensor of shape (L,), (S,) or (L, S) (as adapter_ids and slices say) is expanded."""
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a number or a float tensor; got {scale.dtype}")
        if scale.dim() == 0 and scale.device.type == "cpu":
            return check.float32_value(float(scale), "scale"), None
        expected = (adapters,) * multi + (n_slices,) * sliced
        if scale.dim() and tuple(scale.shape) != expected:
            raise ValueError(f"scale must be a number, a 0-d tensor or a tensor of shape {expected} (one per "
                             f"{' and '.join(['adapter'] * multi + ['slice'] * sliced) or 'call'}); got shape "
                             f"{tuple(scale.shape)}")
        check.check_same_device(scale, "scale", device, "x")
        table = scale.detach().to(torch.float32)   # (a 0-d device tensor too: read on the device, no sync)
        table = table.reshape((adapters if multi and table.dim() else 1), (n_slices if sliced and table.dim() else 1))
        return 1.0, table.expand(adapters, n_slices).contiguous()
    return check.float32_value(scale, "scale"), None


def _checking_values(t: torch.Tensor) -> bool:
    """Whether the values of t can be read for a check here: not while torch.compile traces, nor while
    a CUDA graph captures (a read would synchronize)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale, *,
                bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, seed: Optional[int] = None,
                adapter_ids: Optional[torch.Tensor] = None, ranks=None, slices: Optional[Sequence[int]] = None,
                check_ids: bool = True) -> torch.Tensor:
    """LoRA linear, llmkernels.reference.lora.lora_linear's semantics: x (M, K) bf16/fp16 (float32 on
    CPU tensors), weight (N, K) frozen, or an llmkernels.quant.Int4Weight (QLoRA: dequantized in the
    fused kernel's main loop; on CUDA its scales in x's dtype; the backward's dx uses it dequantized),
    N and K multiples of 8, bias (N) optional -> (M, N) in x's dtype. lora_a, lora_b (x's dtype) and scale by case (r <= 256: the rank, padded with zeros to a
    multiple of 8 when it is not one, a copy):

        adapter_ids  slices   lora_a         lora_b       scale
        None         None     (r, K)         (N, r)       number
        (M,)         None     (L, r, K)      (L, N, r)    number or (L,)
        None         (n_s)    (S, r, K)      (N, r)       number or (S,)
        (M,)         (n_s)    (L, S, r, K)   (L, N, r)    number or (L, S)

    adapter_ids (multi-adapter serving): int32/int64 (M,), row m uses adapter adapter_ids[m], -1 none;
    rows need no sorting (rows sorted by adapter run fewer k tiles per block at large M). ranks: L ints
    in [0, r] (a list, or an int32 tensor on x's device), adapter l reading only its first ranks[l]
    rows of A and columns of B. The ids (and a ranks tensor) are checked to lie in range with one
    device read, unless check_ids=False, a CUDA graph is being captured or torch.compile traces: then
    an id outside [-1, L) is read as -1 (no adapter), a rank outside [0, r] is not caught (the kernels
    clamp it to [0, r]). A NaN or Inf in one adapter's A or B reaches the other rows that share a row
    tile with that adapter's rows on the CUDA kernels (one set of sums per tile; the CPU kernel keeps
    rows apart): check adapters when they are loaded (torch.isfinite). Multi-adapter calls are
    forward-only (serving): with autograd
    recording and an input that requires grad they raise.
    slices (fused projections, e.g. [q, k, v] rows of a stacked QKV weight): S <= 8 positive multiples
    of 8 summing to N; slice s's output columns get their own adapter lora_a[s] and scale.

    Differentiable (one adapter) with respect to x, lora_a, lora_b and bias (_LoraLinear); the weight
    must not require grad (it is frozen). dropout_p in [0, 1): LoRA's input dropout, the mask of
    llmkernels.reference.lora.dropout_keep for `seed` (an int; drawn from torch's default CPU generator
    when None: no device synchronization, but a CUDA graph replays the seed it captured). The backward
    regenerates the mask; nothing is stored."""
    int4 = weight if isinstance(weight, quant.Int4Weight) else None
    if int4 is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        for name, t in (("packed", int4.packed), ("scales", int4.scales), ("zeros", int4.zeros)):
            check.check_same_device(t, f"weight.{name} (Int4Weight)", x.device, "x")
        if x.device.type == "cuda" and int4.scales.dtype != x.dtype:
            raise TypeError(f"weight.scales (Int4Weight) must have x's dtype {x.dtype} on CUDA (the kernel "
                            f"dequantizes in it); got {int4.scales.dtype}: quantize with scale_dtype=x.dtype")
        weight = int4.packed   # (the kernels' int4 base; its shape checks below use int4.shape)
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or (weight) an llmkernels.quant.Int4Weight; got "
                            f"{type(t).__name__}")
        if t.dtype != x.dtype and not (name == "weight" and int4 is not None):
            raise TypeError(f"{name} must have x's dtype {x.dtype}; got {t.dtype}")
    multi, sliced = adapter_ids is not None, slices is not None
    for name, t, dims in (("x", x, 2), ("weight", weight, 2 if int4 is None else 3),
                          ("lora_a", lora_a, 2 + multi + sliced), ("lora_b", lora_b, 2 + multi)):
        if t.dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions here (adapter_ids {'given' if multi else 'None'}, "
                             f"slices {'given' if sliced else 'None'}); got shape {tuple(t.shape)}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight must not require grad: LoRA's base weight is frozen (weight.requires_grad_(False))")
    n, k = weight.shape if int4 is None else int4.shape
    if x.shape[1] != k:
        raise ValueError(f"weight must be (N, K) with x's K = {x.shape[1]} columns; got {tuple(weight.shape)}")
    adapters = lora_a.shape[0] if multi else 1
    n_slices = lora_a.shape[-3] if sliced else 1
    rank = lora_a.shape[-2]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"lora_a must have a rank (dimension -2) of 1 to {MAX_RANK}; got {tuple(lora_a.shape)}")
    if lora_a.shape[-1] != k:
        raise ValueError(f"lora_a must end in (r, K = {k}) (x's columns); got {tuple(lora_a.shape)}")
    expected_b = (adapters,) * multi + (n, rank)
    if tuple(lora_b.shape) != expected_b:
        raise ValueError(f"lora_b must be {expected_b} (adapters, weight's rows N, lora_a's rank r); got "
                         f"{tuple(lora_b.shape)}")
    if multi and adapters < 1:
        raise ValueError(f"lora_a must hold at least one adapter; got {tuple(lora_a.shape)}")
    if sliced:
        slices = list(slices)
        if not 1 <= len(slices) <= MAX_SLICES or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % 8
                                                      for v in slices) or sum(slices) != n:
            raise ValueError(f"slices must be 1 to {MAX_SLICES} positive multiples of 8 summing to N = {n}; got "
                             f"{slices!r}")
        if n_slices != len(slices):
            raise ValueError(f"lora_a must have {len(slices)} slices (len(slices)) in dimension {int(multi)}; got "
                             f"shape {tuple(lora_a.shape)}")
    else:
        slices = [n]
    scale, scales = _scale_table(scale, adapters, n_slices, multi, sliced, x.device)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a ({n},) tensor; got {tuple(getattr(bias, 'shape', ()))}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")
    ids = rank_table = None
    if multi:
        if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in (torch.int32, torch.int64):
            got = adapter_ids.dtype if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__
            raise TypeError(f"adapter_ids must be an int32 or int64 tensor; got {got}")
        if tuple(adapter_ids.shape) != (x.shape[0],):
            raise ValueError(f"adapter_ids must have shape ({x.shape[0]},) (one per row of x); got "
                             f"{tuple(adapter_ids.shape)}")
        check.check_same_device(adapter_ids, "adapter_ids", x.device, "x")
        if check_ids and adapter_ids.numel() and _checking_values(adapter_ids):
            low, high = torch.aminmax(adapter_ids)
            low, high = int(low), int(high)
            if low < -1 or high >= adapters:
                raise ValueError(f"adapter_ids must lie in [-1, {adapters}) (L = {adapters} adapters, -1 = none); "
                                 f"got values from {low} to {high}")
        ids = adapter_ids
        if ids.dtype == torch.int64:   # (ids past int32 read as -1 too, not wrapped into range)
            ids = torch.where((ids >= -1) & (ids < adapters), ids, -1)
        ids = ids.to(torch.int32).contiguous()
        if ranks is not None:
            if isinstance(ranks, torch.Tensor):
                if ranks.dtype != torch.int32 or tuple(ranks.shape) != (adapters,):
                    raise ValueError(f"ranks must be an int32 tensor of shape ({adapters},) or a list of ints; got "
                                     f"{ranks.dtype} {tuple(ranks.shape)}")
                check.check_same_device(ranks, "ranks", x.device, "x")
                rank_table = ranks.contiguous()
                values = rank_table.tolist() if check_ids and _checking_values(rank_table) else None
            else:
                values = list(ranks)
                if len(values) != adapters or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                    raise ValueError(f"ranks must be {adapters} ints (one per adapter); got {ranks!r}")
                if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise ValueError("ranks must be an int32 tensor on the device while a CUDA graph captures (a "
                                     "list is copied to the device at each call, which a replay would not redo)")
                rank_table = torch.tensor(values, dtype=torch.int32).to(x.device)
            if values is not None and any(not 0 <= v <= rank for v in values):
                raise ValueError(f"ranks must lie in [0, {rank}] (lora_a's rank r); got {values}")
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (x, lora_a, lora_b, bias)):
            raise ValueError("multi-adapter lora_linear (adapter_ids) is forward-only, for serving: call it under "
                             "torch.no_grad() or torch.inference_mode(), or train one adapter at a time")
    elif ranks is not None:
        raise ValueError("ranks needs adapter_ids (a single adapter uses all of lora_a's rows)")
    dropout = None
    if dropout_p > 0:
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())   # (a CPU tensor: no device synchronization)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {type(seed).__name__}")
        if not -2 ** 63 <= seed < 2 ** 64:
            raise ValueError(f"seed must be an int in [-2**63, 2**64); got {seed}")
        threshold = min(math.floor(float(dropout_p) * 2 ** 32), 2 ** 32 - 1)
        dropout = (check.as_int64_pattern(seed % 2 ** 64), threshold, 1.0 / (1.0 - float(dropout_p)))
    lora_a = lora_a.reshape(adapters, n_slices, rank, k)
    lora_b = lora_b.reshape(adapters, n, rank)
    if rank % 8:   # the kernels read rows of 8-element chunks: zero rank columns added (they add nothing)
        pad = 8 - rank % 8
        lora_a = torch.nn.functional.pad(lora_a, (0, 0, 0, pad))
        lora_b = torch.nn.functional.pad(lora_b, (0, pad))
    x, lora_a, lora_b = check.rows_aligned(x), lora_a.contiguous(), lora_b.contiguous()
    if multi:
        x_lora = None if dropout is None else _dropout(x, dropout)
        order = None
        # (the emulator's switch is read outside torch.compile only: a compiled CPU call keeps its rows)
        device = x.device.type == "cuda" or (not torch.compiler.is_compiling() and check.device_kernels(x))
        if x.shape[0] > SORTED_ROWS and adapters > 1 and device:
            # segment-style: rows sorted by adapter (a device sort, no synchronization), so that each of
            # the kernels' row tiles holds one or two adapters; x's rows are read and out's written
            # through the order
            order = torch.argsort(ids, stable=True).to(torch.int32)
            ids = ids[order]
        return _lora_linear(x, x_lora, weight.contiguous(), lora_a, lora_b, scale, scales,
                            None if bias is None else bias.float(), ids, order, rank_table, slices,
                            *_int4_args(int4), False)[1]
    return _LoraLinear.apply(x, weight.contiguous(), lora_a, lora_b, bias, scale, scales, slices, dropout, int4)


# -- the layer and the model helper ---------------------------------------------------------------

from .reference import lora as _reference   # noqa: E402  (scaling, and merge/unmerge's arithmetic)

PEFT_PREFIX = "base_model.model."   # what a PeftModel puts before the wrapped model's keys


class LoRALinear(torch.nn.Module):
    """One LoRA adapter on a frozen nn.Linear or llmkernels.quant.Int4Linear (QLoRA) (PEFT's semantics
    with bias="none"):

        y = base(x) + scale (x Aᵀ) Bᵀ,   scale = alpha / r, or alpha / sqrt(r) with rslora

    computed by lora_linear (one fused kernel pair). base's weight and bias are frozen
    (requires_grad False: to train the bias too, call base_layer.bias.requires_grad_() afterwards);
    lora_A.weight (r, in) is kaiming-uniform (a = sqrt(5)) and lora_B.weight (out, r) zero, so a new
    layer starts as base. Parameters take base's weight's dtype (an Int4Linear's scale dtype) and
    device: bfloat16 or float16 (float32 on the CPU for an nn.Linear), in_features and out_features
    multiples of 8, 1 <= r <= 256. An Int4Linear base keeps its state-dict keys under base_layer.
    (packed, scales, zeros, bias) and cannot be merged into.
    dropout: LoRA's input dropout in training mode (lora_linear's, a fresh seed each call).

    merge() adds scale B A into base's weight (float32 arithmetic, rounded once); forward is then
    the base linear alone and the adapter gets no gradient; unmerge() subtracts it again, giving back
    the weight within one rounding (one unit in the last place of the merged element)."""

    def __init__(self, base: torch.nn.Module, r: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not isinstance(base, (torch.nn.Linear, quant.Int4Linear)):
            raise TypeError(f"base must be a torch.nn.Linear or an llmkernels.quant.Int4Linear; got "
                            f"{type(base).__name__}")
        if base.in_features % 8 or base.out_features % 8:
            raise ValueError(f"base must have in_features and out_features multiples of 8; got "
                             f"in_features={base.in_features}, out_features={base.out_features}")
        self.r = check.integer(r, "r", 1, MAX_RANK + 1)
        self.alpha = check.float32_value(alpha, "alpha")
        dropout = check.real(dropout, "dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if not isinstance(rslora, bool):
            raise TypeError(f"rslora must be a bool; got {type(rslora).__name__}")
        self.dropout, self.rslora = dropout, rslora
        self.scale = _reference.scaling(self.alpha, self.r, rslora)
        self.merged = False
        quantized = isinstance(base, quant.Int4Linear)   # (QLoRA: the adapter in the int4 weight's scale dtype)
        factory = ({"dtype": base.scales.dtype, "device": base.packed.device} if quantized else
                   {"dtype": base.weight.dtype, "device": base.weight.device})
        self.base_layer = base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(base.in_features, self.r, bias=False, **factory)
        self.lora_B = torch.nn.Linear(self.r, base.out_features, bias=False, **factory)
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def reset_parameters(self) -> None:
        """PEFT's init (init_lora_weights=True): A like nn.Linear's weight, B zero."""
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., in_features={self.in_features}); got {tuple(x.shape)}")
        dtype = self.lora_A.weight.dtype
        if x.dtype != dtype:
            raise TypeError(f"x must have the layer's dtype {dtype}; got {x.dtype}")
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        weight = base.quantized_weight() if isinstance(base, quant.Int4Linear) else base.weight
        out = lora_linear(x.reshape(-1, self.in_features), weight, self.lora_A.weight, self.lora_B.weight,
                          self.scale, bias=self.base_layer.bias, dropout_p=self.dropout if self.training else 0.0)
        return out.reshape(*x.shape[:-1], self.out_features)

    def merge(self) -> None:
        """base weight += scale B A (in place; refuses a second merge, and an int4 base, which cannot
        absorb the adapter exactly)."""
        if isinstance(self.base_layer, quant.Int4Linear):
            raise TypeError("LoRALinear.merge: an Int4Linear base cannot absorb the adapter exactly (dequantize it "
                            "into an nn.Linear first)")
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the adapter is already merged (call unmerge() first)")
        self._set_weight(_reference.merge)
        self.merged = True

    def unmerge(self) -> None:
        """base weight -= scale B A (in place; only after merge)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapter is not merged (call merge() first)")
        self._set_weight(_reference.unmerge)
        self.merged = False

    def _set_weight(self, combine) -> None:
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.copy_(combine(weight, self.lora_A.weight, self.lora_B.weight, self.scale))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}, rslora={self.rslora}, merged={self.merged}")


def _is_target(name: str, target_modules) -> bool:
    """PEFT's rule for a list of names: the qualified name is a target or ends in "." + a target."""
    return any(name == target or name.endswith("." + target) for target in target_modules)


def add_lora_(model: torch.nn.Module, target_modules, r: int, alpha: float, *, dropout: float = 0.0,
              rslora: bool = False) -> torch.nn.Module:
    """Replaces, in place, every nn.Linear (or quant.Int4Linear: QLoRA) of model whose qualified name ends in one of target_modules
    (PEFT's matching: "q_proj" matches "layers.0.self_attn.q_proj") by a LoRALinear wrapping it, and
    freezes every other parameter (only the adapters train, PEFT's bias="none"). Returns model.
    Linears inside an existing LoRALinear are never targets."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(target_modules, str) or not all(isinstance(t, str) and t for t in target_modules):
        raise TypeError(f"target_modules must be a list of non-empty module names (PEFT's regex string form is "
                        f"not supported); got {target_modules!r}")
    inside = {f"{name}.{child}" if name else child for name, module in model.named_modules()
              if isinstance(module, LoRALinear) for child in ("base_layer", "lora_A", "lora_B")}
    targets = [name for name, module in model.named_modules()
               if isinstance(module, (torch.nn.Linear, quant.Int4Linear)) and name and name not in inside
               and _is_target(name, target_modules)]
    if not targets:
        raise ValueError(f"target_modules {list(target_modules)!r} matched no torch.nn.Linear or Int4Linear of the model "
                         f"(Linears already wrapped by LoRALinear are skipped)")
    frozen_before = [(p, p.requires_grad) for p in model.parameters()]
    try:   # every target built before the model changes; a refused one leaves the model as it was
        wrapped = {name: LoRALinear(model.get_submodule(name), r, alpha, dropout=dropout, rslora=rslora)
                   for name in targets}
    except Exception:
        for p, requires_grad in frozen_before:
            p.requires_grad_(requires_grad)
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in wrapped.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)   # its adapter was not in the model when frozen: it trains
    return model


def _peft_names(model: torch.nn.Module, adapter_name: str):
    """{our key: PEFT's in-memory key} for the adapters' weights of every LoRALinear in model."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty name without dots; got {adapter_name!r}")
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            prefix = f"{name}." if name else ""
            for matrix in ("lora_A", "lora_B"):
                names[f"{prefix}{matrix}.weight"] = f"{prefix}{matrix}.{adapter_name}.weight"
    return names


def peft_state_dict(model: torch.nn.Module, adapter_name: str = "default"):
    """model.state_dict() under PEFT's in-memory names: each LoRALinear's lora_A.weight / lora_B.weight
    become lora_A.<adapter_name>.weight / lora_B.<adapter_name>.weight (base_layer.* and every other
    key unchanged): the keys of get_peft_model(model).base_model.model.state_dict()."""
    names = _peft_names(model, adapter_name)
    return {names.get(key, key): value for key, value in model.state_dict().items()}


def load_peft_state_dict(model: torch.nn.Module, state_dict, adapter_name: str = "default", strict: bool = True):
    """Loads a dict with PEFT's key names into model (its LoRALinears in place): keys may carry the
    adapter name (lora_A.<adapter_name>.weight, the in-memory form) or not (a saved adapter file), and
    PeftModel's base_model.model. prefix. A saved adapter holds only the LoRA weights: pass
    strict=False. Returns torch's load_state_dict result (missing and unexpected keys)."""
    ours = {peft: key for key, peft in _peft_names(model, adapter_name).items()}
    converted = {}
    for key, value in state_dict.items():
        key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        converted[ours.get(key, key)] = value
    return model.load_state_dict(converted, strict=strict)
