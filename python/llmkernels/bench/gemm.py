"""GEMM core benchmark cases: the core (llmkernels._gemm.gemm, no epilogue) against torch.matmul
(x @ weight.T: cuBLAS on a GPU, oneDNN/MKL on the CPU) on Llama-3-8B's projection shapes.

    gemm.core   x (M, K) @ weight (N, K).T, bf16 in and out, fp32 accumulation

Shapes (N, K): q/o (4096, 4096), k/v (1024, 4096), gate/up (14336, 4096), down (4096, 14336), with
M in {1, 16, 128, 1024, 8192} on CUDA. On the CPU a small quick set (the CPU kernel against torch's
CPU matmul) that stays under ~30 s. Cases with M <= 16 read the weights once and do little else:
they are reported in GB/s against the copy bandwidth; larger M in TFLOP/s against the matmul peak.

Checks (run on a fresh input set before anything is timed): each side's output is poisoned with
NaN first, and after the call must be finite and close to a float32 matmul of the same inputs.
"""
import dataclasses
import functools
from typing import List, Optional

import torch

from .._gemm import ACTIVATIONS, _gemm, workspace
from .core import Case, Target, register

LLAMA3_8B = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
CUDA_ROWS = (1, 16, 128, 1024, 8192)
CPU_SHAPES = [  # (M, N, K): one decode-like and one prefill-like product per projection kind, scaled down
    (1, 4096, 4096), (16, 1024, 4096), (128, 1024, 1024), (256, 2048, 512)]
MEMORY_BOUND_ROWS = 16   # M <= this: GB/s of the weights against the copy bandwidth


@dataclasses.dataclass
class GemmInputs:
    x: torch.Tensor
    weight: torch.Tensor
    out: torch.Tensor          # ours writes here, the anchor into anchor_out (matmul(out=))
    anchor_out: torch.Tensor
    workspace: torch.Tensor    # ours' split-K scratch (small M), preallocated like out


def make_inputs(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> GemmInputs:
    x = torch.randn(m, k, device=device).to(dtype)
    weight = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
    return GemmInputs(x, weight, torch.empty(m, n, device=device, dtype=dtype),
                      torch.empty(m, n, device=device, dtype=dtype), workspace(m, n, k, device))


def _ours(inputs: GemmInputs) -> None:
    # the op itself into a preallocated output, as the anchor's matmul(out=)
    _gemm(inputs.x, None, inputs.weight, None, None, None, ACTIVATIONS["none"], False, inputs.out, inputs.workspace)


def _matmul(inputs: GemmInputs) -> None:
    torch.matmul(inputs.x, inputs.weight.T, out=inputs.anchor_out)


def _check(attribute: str, inputs: GemmInputs, run) -> None:
    """The call wrote its output (poisoned first): finite, and within a few bf16 units of a float32
    matmul of the same inputs (relative to the output's scale)."""
    getattr(inputs, attribute).fill_(float("nan"))
    run(inputs)
    out = getattr(inputs, attribute)
    assert torch.isfinite(out).all(), f"{attribute} has non-finite values (not written?)"
    expected = inputs.x.float() @ inputs.weight.float().T
    scale = expected.abs().max().item()
    error = (out.float() - expected).abs().max().item()
    assert error <= 2 ** -6 * scale, f"{attribute} is off a float32 matmul by {error:.3g} (output scale {scale:.3g})"


check_ours = functools.partial(_check, "out")
check_anchor = functools.partial(_check, "anchor_out")


def _targets(device: torch.device, m: int, n: int, k: int) -> List[Target]:
    if device.type != "cuda":
        return []
    if m <= MEMORY_BOUND_ROWS:
        return [Target("ratio", 0.9, "CUDA >= 0.9x cuBLAS at M <= 16")]
    if min(m, n, k) >= 4096:
        return [Target("ratio", 0.6, "CUDA >= 0.6x cuBLAS at M, N, K >= 4096")]
    return []


def _case(m: int, n: int, k: int, label: Optional[str], dtype: torch.dtype, device: torch.device) -> Case:
    size = dtype.itemsize
    memory_bound = m <= MEMORY_BOUND_ROWS
    description = f"M={m} N={n} K={k}" + (f" ({label})" if label else "")
    return Case(name="gemm.core", description=description, dtype=dtype, device=device,
                setup=functools.partial(make_inputs, m, n, k, dtype, device),
                run=_ours, check=check_ours, anchor_name="x @ weight.T (torch.matmul)", anchor_run=_matmul,
                anchor_check=check_anchor,
                bytes_moved=(m * k + n * k + m * n) * size,   # A and the weights read, out written once
                flops=None if memory_bound else 2 * m * n * k,
                targets=tuple(_targets(device, m, n, k)))


@register("gemm")
def cases(device: torch.device, quick: bool) -> List[Case]:
    dtype = torch.bfloat16
    if device.type != "cuda":
        shapes = CPU_SHAPES[:2] if quick else CPU_SHAPES
        return [_case(m, n, k, None, dtype, device) for m, n, k in shapes]
    rows = (1, 128, 8192) if quick else CUDA_ROWS
    return [_case(m, n, k, label, dtype, device) for label, (n, k) in LLAMA3_8B.items() for m in rows]
