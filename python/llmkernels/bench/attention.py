"""Attention benchmark cases: our kernels against PyTorch's scaled_dot_product_attention (SDPA).

    attention.forward     attention(q, k, v, causal)                 vs  SDPA forward
    attention.backward    the gradients of out (forward done before)  vs  SDPA's backward
    attention.fwd_bwd     forward, then the gradients                vs  SDPA forward + backward

CUDA (bf16): the FlashAttention papers' shapes, batch x seqlen = 16k tokens and heads x head_dim =
2048 (head_dim 64 with 32 heads, 128 with 16). Anchors, each measured in the same run where the GPU
offers it: SDPA restricted to its FLASH (FlashAttention-2) backend on every op, causal and not, at
seqlen 1k and 4k (with --quick 4k only) and 16k for the forward; its CUDNN and EFFICIENT
(memory-efficient) backends on the forward and forward+backward at 4k, causal.
Targets: >= 1.0x SDPA-FLASH forward and backward at seqlen >= 1k (issue 10); cuDNN is the next bar.
CPU (fp32): the forward and forward+backward at (seqlen 512, head_dim 64) and (1024, 128) (with
--quick the first only), batch 2, 8 heads, causal, against CPU SDPA, with the 0.5x target.

TFLOP/s count the matmuls as FlashAttention does: forward 4 * batch * heads * seqlen^2 * head_dim
(half of it under a causal mask), the backward 2.5x the forward (five matmuls to two).

Checks (before anything is timed): each side's output is finite, and its last 128 query rows match a
float32 SDPA (math backend) of the same inputs within bf16 rounding (fp32 rounding on the CPU);
gradients are finite and nonzero.
"""
import contextlib
import functools
from typing import List, Optional

import torch
import torch.nn.functional as F

from .._attention import attention
from .core import Case, Target, register

CPU_SHAPES = [(512, 64), (1024, 128)]   # (seqlen, head_dim)
CPU_BATCH, CPU_HEADS = 2, 8
CUDA_TOKENS, CUDA_WIDTH = 16384, 2048   # batch x seqlen, heads x head_dim
CUDA_HEAD_DIMS = (64, 128)
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def _sdpa_context(backend: Optional[str]):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, backend))


def make_inputs(batch: int, seqlen: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                causal: bool, backward: str, backend: Optional[str]):
    """q, k, v (batch, seqlen, heads, head_dim) and dout; for the backward-only case, the forward's
    autograd graphs of both sides, built here so that only the backward is timed."""
    q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, device=device).to(dtype) for _ in range(4))
    inputs = {"q": q, "k": k, "v": v, "dout": dout, "causal": causal, "backend": backend, "out": None}
    if backward == "only":
        for side, forward in (("ours", _ours_forward), ("anchor", _sdpa_forward)):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            inputs[side] = (leaves, forward(inputs, *leaves))
    return inputs


def _ours_forward(inputs, q, k, v):
    return attention(q, k, v, causal=inputs["causal"])


def _sdpa_forward(inputs, q, k, v):
    with _sdpa_context(inputs["backend"]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=inputs["causal"])
    return out.transpose(1, 2)


def _run(side: str, backward: str, inputs) -> None:
    """One timed call: the forward, the forward and its gradients, or only the gradients."""
    forward = _ours_forward if side == "ours" else _sdpa_forward
    if backward == "only":
        leaves, out = inputs[side]
        with _sdpa_context(inputs["backend"] if side == "anchor" else None):
            inputs["grads"] = torch.autograd.grad(out, leaves, inputs["dout"], retain_graph=True)
        inputs["out"] = out.detach()
        return
    if backward == "no":
        inputs["out"] = forward(inputs, inputs["q"], inputs["k"], inputs["v"])
        return
    leaves = [inputs[n].detach().requires_grad_() for n in "qkv"]
    out = forward(inputs, *leaves)
    with _sdpa_context(inputs["backend"] if side == "anchor" else None):
        inputs["grads"] = torch.autograd.grad(out, leaves, inputs["dout"])
    inputs["out"] = out.detach()


CHECK_ROWS = 128   # the last queries, checked against a float32 SDPA (all of them would be 16 GB at 16k)


def _check(inputs, run) -> None:
    inputs.pop("grads", None)
    run(inputs)
    out = inputs["out"]
    seqlen = out.shape[1]
    rows = min(CHECK_ROWS, seqlen)
    q = inputs["q"][:, seqlen - rows:].float().transpose(1, 2)
    k, v = (inputs[n].float().transpose(1, 2) for n in "kv")
    mask = None
    if inputs["causal"]:   # query seqlen - rows + r sees keys up to its own position
        mask = torch.arange(seqlen, device=out.device)[None, :] <= torch.arange(seqlen - rows, seqlen,
                                                                                 device=out.device)[:, None]
    with _sdpa_context("MATH" if out.device.type == "cuda" else None):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert torch.isfinite(out).all(), "non-finite output"
    error = (out[:, seqlen - rows:].float() - expected).abs().max().item()
    limit = 1e-4 if out.dtype == torch.float32 else 3e-2
    assert error < limit, f"output off a float32 SDPA by {error:.3g}"
    for grad in inputs.get("grads", []):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, "gradient not written"


def _case(op: str, batch: int, seqlen: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
          causal: bool, backend: Optional[str], targets) -> Case:
    backward = {"forward": "no", "backward": "only", "fwd_bwd": "with"}[op]
    forward_flops = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)
    flops = {"forward": forward_flops, "backward": forward_flops * 5 // 2, "fwd_bwd": forward_flops * 7 // 2}[op]
    element = torch.finfo(dtype).bits // 8
    tensors = {"forward": 4, "backward": 8, "fwd_bwd": 8}[op]    # q, k, v, out (+ dout, dq, dk, dv)
    anchor = "SDPA (CPU)" if backend is None else "SDPA " + backend.split("_")[0]
    return Case(name=f"attention.{op}", description=f"b{batch} h{heads} s{seqlen} d{head_dim}"
                                                     f"{' causal' if causal else ''}",
                dtype=dtype, device=device,
                setup=functools.partial(make_inputs, batch, seqlen, heads, head_dim, dtype, device, causal, backward,
                                        backend),
                run=functools.partial(_run, "ours", backward), check=_check, anchor_name=anchor,
                anchor_run=functools.partial(_run, "anchor", backward), anchor_check=_check,
                bytes_moved=tensors * batch * seqlen * heads * head_dim * element, flops=flops, targets=targets)


def _available_backends(device: torch.device) -> List[str]:
    """The SDPA backends that run a small causal bf16 forward and backward on this GPU."""
    available = []
    q = torch.randn(1, 2, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    for backend in SDPA_BACKENDS:
        try:
            with _sdpa_context(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
            available.append(backend)
        except RuntimeError:
            pass
    return available


@register("attention")
def cases(device: torch.device, quick: bool) -> List[Case]:
    if device.type == "cpu":
        cpu_target = (Target("ratio", 0.5, "CPU >= 0.5x SDPA (seqlen >= 512)"),)
        shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
        built = [_case("forward", CPU_BATCH, s, CPU_HEADS, d, torch.float32, device, True, None, cpu_target)
                 for s, d in shapes]
        return built + [_case("fwd_bwd", CPU_BATCH, s, CPU_HEADS, d, torch.float32, device, True, None, cpu_target)
                        for s, d in shapes]
    # SDPA-FLASH, the target, on every op and shape; cuDNN and the memory-efficient kernel on the
    # forward and forward+backward at 4k, causal (a bounded number of cases: gpu_check.sh's budget).
    built = []
    flash_target = (Target("ratio", 1.0, "CUDA >= 1.0x SDPA-FLASH (seqlen >= 1k)"),)
    for backend in _available_backends(device):
        flash = backend == "FLASH_ATTENTION"
        seqlens = (4096,) if quick or not flash else (1024, 4096)
        for head_dim in CUDA_HEAD_DIMS:
            heads = CUDA_WIDTH // head_dim
            for causal in (False, True) if flash else (True,):
                for seqlen in seqlens:
                    for op in ("forward", "backward", "fwd_bwd") if flash else ("forward", "fwd_bwd"):
                        built.append(_case(op, CUDA_TOKENS // seqlen, seqlen, heads, head_dim, torch.bfloat16,
                                           device, causal, backend, flash_target if flash else ()))
                if flash and not quick:
                    built.append(_case("forward", 1, 16384, heads, head_dim, torch.bfloat16, device, causal, backend,
                                       flash_target))
    return built
