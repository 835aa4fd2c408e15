"""Attention benchmark cases (issue 10, in progress): the CPU kernels against CPU SDPA.

    attention.forward     attention(q, k, v, causal)            vs  scaled_dot_product_attention
    attention.fwd_bwd     the same, then backward of out.sum()  vs  SDPA forward + backward

fp32, batch 2, 8 heads, causal, seqlen 512 (head_dim 64) and, forward only and not with --quick,
1024 (head_dim 128): the CPU backward takes seconds there (docs/attention.md).
The CUDA kernels do not exist yet, so there are no CUDA cases: the FlashAttention-paper shapes
against SDPA's FLASH, CUDNN and EFFICIENT backends come with them.

Checks (before anything is timed): each side's output is finite and matches a float64 SDPA of the
same inputs within fp32 rounding; fwd_bwd's gradients are finite and nonzero.
"""
import functools
from typing import List

import torch
import torch.nn.functional as F

from ..attention import attention
from .core import Case, Target, register

SHAPES = [(512, 64), (1024, 128)]   # (seqlen, head_dim)
BATCH, HEADS = 2, 8


def make_inputs(seqlen: int, head_dim: int, device: torch.device):
    q, k, v = (torch.randn(BATCH, seqlen, HEADS, head_dim, device=device) for _ in range(3))
    return {"q": q, "k": k, "v": v, "out": None}


def _ours(inputs) -> None:
    inputs["out"] = attention(inputs["q"], inputs["k"], inputs["v"], causal=True)


def _sdpa(inputs) -> None:
    q, k, v = (inputs[n].transpose(1, 2) for n in "qkv")
    inputs["out"] = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def _with_backward(forward, inputs) -> None:
    leaves = {n: inputs[n].detach().requires_grad_() for n in "qkv"}
    forward(leaves)
    leaves["out"].sum().backward()
    inputs["out"] = leaves["out"].detach()
    inputs["grads"] = [leaves[n].grad for n in "qkv"]


def _check(inputs, run) -> None:
    run(inputs)
    out = inputs["out"]
    q, k, v = (inputs[n].double().transpose(1, 2) for n in "qkv")
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert torch.isfinite(out).all(), "non-finite output"
    error = (out.double() - expected).abs().max().item()
    assert error < 1e-4, f"output off a float64 SDPA by {error:.3g}"
    for grad in inputs.get("grads", []):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, "gradient not written"


def _case(name: str, seqlen: int, head_dim: int, device: torch.device, backward: bool) -> Case:
    ours = functools.partial(_with_backward, _ours) if backward else _ours
    anchor = functools.partial(_with_backward, _sdpa) if backward else _sdpa
    flops = 2 * 2 * BATCH * HEADS * seqlen * seqlen * head_dim // 2   # QKᵀ and PV, causal half
    if backward:
        flops = flops * 7 // 2   # the backward's five matmuls (FlashAttention-2's count) on top
    return Case(name=name, description=f"b{BATCH} h{HEADS} s{seqlen} d{head_dim} causal", dtype=torch.float32,
                device=device, setup=functools.partial(make_inputs, seqlen, head_dim, device), run=ours,
                check=_check, anchor_name="SDPA (CPU)", anchor_run=anchor, anchor_check=_check,
                bytes_moved=4 * BATCH * seqlen * HEADS * head_dim * 4, flops=flops,
                targets=(Target("ratio", 0.5, "CPU >= 0.5x SDPA (seqlen >= 512)"),))


@register("attention")
def cases(device: torch.device, quick: bool) -> List[Case]:
    if device.type != "cpu":
        return []   # no CUDA kernel yet
    shapes = SHAPES[:1] if quick else SHAPES
    cases = [_case("attention.forward", s, d, device, False) for s, d in shapes]
    return cases + [_case("attention.fwd_bwd", s, d, device, True) for s, d in SHAPES[:1]]
