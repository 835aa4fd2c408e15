"""Quantized GEMM benchmark cases (issue 11, in progress): W4A16 on the CPU so far.

    quant.int4_linear   x (M, K) bf16 @ int4 weight (N, K), group 128  vs  torch._weight_int4pack_mm_for_cpu
                                                                       and  x @ w.T in bf16 (torch.matmul)

Shapes: Llama-3-8B's q/o projection (N = K = 4096) at M = 1 and 16 (--quick: M = 1). The int4 anchor
gets the same weight in its own layout (torch._convert_weight_to_int4pack_for_cpu) with the zero
point folded into its float offset, (8 - z) * s; the bf16 anchor the dequantized weight. Bytes moved
count the packed weight (N * K / 2), scales and zeros, x and out. Target (issue 11): at least as
fast as torch's int4 kernel at M <= 16 (not met yet: docs/quant.md). No CUDA cases: the CUDA kernel
does not exist yet.

Checks (before anything is timed): each side's output is finite and within bf16 rounding of a float32
product with the dequantized weight.
"""
import functools
from typing import List

import torch

from .. import quant
from .core import Case, Target, register

SHAPES = [(1, 4096, 4096), (16, 4096, 4096)]
GROUP_SIZE = 128


def make_inputs(m: int, n: int, k: int, device: torch.device):
    weight = quant.quantize_int4(torch.randn(n, k, device=device) * k ** -0.5, group_size=GROUP_SIZE)
    scales, zeros = weight.scales.float(), weight.zeros.float()
    torch_scales_and_zeros = torch.stack([scales, (8 - zeros) * scales], dim=2).to(torch.bfloat16).contiguous()
    return {
        "x": torch.randn(m, k, device=device).to(torch.bfloat16),
        "weight": weight,
        "torch_packed": torch._convert_weight_to_int4pack_for_cpu(weight.codes().to(torch.int32), 8),
        "torch_scales_and_zeros": torch_scales_and_zeros,
        "dense": quant.dequantize(weight, torch.bfloat16),
        "out": None,
    }


def _ours(inputs) -> None:
    inputs["out"] = quant.int4_linear(inputs["x"], inputs["weight"])


def _torch_int4(inputs) -> None:
    inputs["out"] = torch._weight_int4pack_mm_for_cpu(inputs["x"], inputs["torch_packed"], GROUP_SIZE,
                                                      inputs["torch_scales_and_zeros"])


def _matmul(inputs) -> None:
    inputs["out"] = inputs["x"] @ inputs["dense"].T


def _check(inputs, run) -> None:
    inputs["out"] = None
    run(inputs)
    out = inputs["out"]
    expected = inputs["x"].float() @ quant.dequantize(inputs["weight"]).T
    assert out is not None and torch.isfinite(out).all(), "output not written or not finite"
    error = (out.float() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= 2 ** -6 * scale, f"off a float32 product by {error:.3g} (output scale {scale:.3g})"


def _case(m: int, n: int, k: int, device: torch.device, anchor: str) -> Case:
    anchors = {"torch int4 (CPU)": _torch_int4, "bf16 matmul": _matmul}
    targets = (Target("ratio", 1.0, "CPU >= 1.0x torch's int4 kernel at M <= 16"),) if anchor.startswith("torch") else ()
    return Case(name="quant.int4_linear", description=f"M={m} N={n} K={k} g{GROUP_SIZE}", dtype=torch.bfloat16,
                device=device, setup=functools.partial(make_inputs, m, n, k, device), run=_ours, check=_check,
                anchor_name=anchor, anchor_run=anchors[anchor], anchor_check=_check,
                bytes_moved=n * k // 2 + (n * k // GROUP_SIZE) * 3 + 2 * (m * k + m * n), flops=None, targets=targets)


@register("quant")
def cases(device: torch.device, quick: bool) -> List[Case]:
    if device.type != "cpu" or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return []
    shapes = SHAPES[:1] if quick else SHAPES
    return [_case(m, n, k, device, anchor) for m, n, k in shapes for anchor in ("torch int4 (CPU)", "bf16 matmul")]
