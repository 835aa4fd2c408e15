"""Quantized GEMM benchmark cases (issue 11): W4A16, W8A8 and W8A16 against what a user would run
without us, all with bf16 activations and output.

    quant.int4_linear      W4A16: x (M, K) @ int4 weight (N, K)ᵀ, group 128, 4-bit zero points, bf16 scales
        vs  bf16 matmul                  x @ w.T in bf16, w the dequantized weight (torch.matmul: cuBLAS)
        vs  torch._weight_int4pack_mm    torch's int4 kernel (tinygemm) on the same weight in its layout
                                         (CPU: torch int4 (CPU), torch._weight_int4pack_mm_for_cpu)
    quant.int8_linear      W8A8: x quantized per token by our fused kernel, the int8 GEMM with the
                           per-token x per-channel scales in its epilogue
        vs  bf16 matmul
        vs  torch._int_mm + scaling      x quantized per token with torch ops (the same formula),
                                         torch._int_mm(xq, wq.T) (cuBLAS int8, int32 out), then
                                         * x_scale * w_scale rounded to bf16
    quant.int8_linear_fp   W8A16 (int8_linear(activations="fp")): x times the int8 codes, per-channel scales
        vs  bf16 matmul

CUDA shapes (N, K): Llama-3-8B's projections, q/k/v fused (6144, 4096), o (4096, 4096), gate/up fused
(28672, 4096), down (4096, 14336), and Llama-3-70B's (10240, 8192), (8192, 8192), (57344, 8192),
(8192, 28672); W4A16 and W8A8 at M in 1, 4, 16, 64, 256, 1024, 4096, W8A16 at M in 1, 16, 1024: 224
cases with both torch anchors, roughly 10-20 min on an H100. --quick: 8B o and 70B down at M in 1, 16,
1024 (W8A16: M = 16), 22 cases, about 20-30 s on an H100 (both times estimated, not yet measured).
CPU: W4A16 on 8B o at M = 1 and 16 (--quick: M = 1) against torch's CPU int4 kernel and a bf16 matmul.

Where an anchor cannot run, the case is left out when the list is built (building it touches no
device): torch._weight_int4pack_mm and torch._convert_weight_to_int4pack missing from the build, or K
not a multiple of 16 * INNER_K_TILES (its kernel's check); torch._int_mm at M <= 16 (its CUDA
kernel refuses: M must be greater than 16, K and N multiples of 8, aten/src/ATen/native/cuda/Blas.cpp).

Throughput: cases with M <= 16 read the weight once and do little else: GB/s of the weight's bytes
(packed int4 or int8 codes, scales, zero points) plus x and out, against the copy bandwidth measured
in the same run (flops=None); larger M in TFLOP/s (2 M N K) against the bf16 matmul peak.

Targets (printed under the table, not asserted; bf16 cuBLAS means the bf16 matmul anchor):
    W4A16 at M <= 16 on the layers with N or K >= 8192: >= 3.0x bf16 cuBLAS, and >= 75% of the copy
          bandwidth (the fraction counts bytes_moved; see _targets)
    W4A16 at M >= 512: >= 0.9x bf16 cuBLAS
    W8A8  at M >= 1024: >= 1.5x bf16 cuBLAS and >= 1.0x torch._int_mm with its scaling
    CPU:  W4A16 >= 1.0x torch's CPU int4 kernel at M <= 16

Checks (each side on a fresh input set, before anything is timed): the side's output is poisoned
with NaN first (a preallocated buffer is filled; for a call that allocates its output, see
_poison_next_allocation), and after the call must be finite and within 2^-6 of the output's scale of
a float32 product with the dequantized weight; for the sides that quantize x per token (W8A8 and its
_int_mm anchor), with x quantized and dequantized by the same formula in float64 first. Outputs are
preallocated where the API allows (matmul(out=), _int_mm(out=)); int4_linear, int8_linear and
_weight_int4pack_mm allocate theirs. Inputs smaller than the last-level cache are rotated by the
runner (core.input_sets_needed on bytes_moved).
"""
import dataclasses
import functools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .. import quant
from .core import Case, Run, Target, register

GROUP_SIZE = 128
INNER_K_TILES = 8          # torch's int4 layout: 8 k16 tiles a 16-byte load (gpt-fast's choice)
MEMORY_BOUND_ROWS = 16     # M <= this: GB/s against the copy bandwidth; above, TFLOP/s

LAYERS = [  # (label, N, K): Llama-3 projections (out_features, in_features), q/k/v and gate/up fused
    ("8B qkv", 6144, 4096), ("8B o", 4096, 4096), ("8B gate/up", 28672, 4096), ("8B down", 4096, 14336),
    ("70B qkv", 10240, 8192), ("70B o", 8192, 8192), ("70B gate/up", 57344, 8192), ("70B down", 8192, 28672),
]
ROWS = (1, 4, 16, 64, 256, 1024, 4096)
W8A16_ROWS = (1, 16, 1024)
QUICK_LAYERS = ("8B o", "70B down")   # a small layer (rotated inputs) and one where every target applies
QUICK_ROWS = (1, 16, 1024)
QUICK_W8A16_ROWS = (16,)
CPU_SHAPES = [(1, 4096, 4096), (16, 4096, 4096)]   # (M, N, K)


@dataclasses.dataclass
class QuantInputs:
    x: torch.Tensor                                   # (M, K) bf16
    weight: Union[quant.Int4Weight, quant.Int8Weight]
    out: Optional[torch.Tensor] = None                # ours: the op allocates its output (no out= in the API)
    anchor_out: Optional[torch.Tensor] = None         # preallocated by the anchor's prepare, or set by its call
    dense: Optional[torch.Tensor] = None              # bf16 matmul: the dequantized weight in bf16 (N, K)
    torch_int4: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # torch int4: (packed weight, scales_and_zeros)
    accumulator: Optional[torch.Tensor] = None        # torch._int_mm: int32 (M, N)

    @property
    def out_shape(self) -> Tuple[int, int]:
        n = self.weight.shape[0] if isinstance(self.weight, quant.Int4Weight) else self.weight.data.shape[0]
        return (self.x.shape[0], n)


# -- our side: one op per quantization scheme ----------------------------------------------------

def _int4_linear(inputs: QuantInputs) -> None:
    inputs.out = quant.int4_linear(inputs.x, inputs.weight)


def _int8_linear(inputs: QuantInputs) -> None:
    inputs.out = quant.int8_linear(inputs.x, inputs.weight)


def _int8_linear_fp(inputs: QuantInputs) -> None:
    inputs.out = quant.int8_linear(inputs.x, inputs.weight, activations="fp")


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    run: Run
    quantize: Callable[[torch.Tensor], Union[quant.Int4Weight, quant.Int8Weight]]
    weight_bytes: Callable[[int, int], int]   # (N, K) -> bytes of the weight and its scales / zero points
    quantizes_activations: bool


OPS = {
    "w4a16": Op("quant.int4_linear", _int4_linear, functools.partial(quant.quantize_int4, group_size=GROUP_SIZE),
                lambda n, k: n * k // 2 + (n * k // GROUP_SIZE) * 3,   # 4-bit codes; bf16 scale + uint8 zero a group
                quantizes_activations=False),
    "w8a8": Op("quant.int8_linear", _int8_linear, quant.quantize_int8,
               lambda n, k: n * k + 4 * n, quantizes_activations=True),   # int8 codes, float32 scale a row
    "w8a16": Op("quant.int8_linear_fp", _int8_linear_fp, quant.quantize_int8,
                lambda n, k: n * k + 4 * n, quantizes_activations=False),
}


# -- anchors: each one's operands (prepare, on a fresh input set) and its timed call ----------------

def _prepare_matmul(inputs: QuantInputs) -> None:
    inputs.dense = quant.dequantize(inputs.weight, torch.bfloat16)
    inputs.anchor_out = inputs.x.new_empty(inputs.out_shape)


def _matmul(inputs: QuantInputs) -> None:
    torch.matmul(inputs.x, inputs.dense.T, out=inputs.anchor_out)


def _torch_scales_and_zeros(weight: quant.Int4Weight) -> torch.Tensor:
    """(K / group, N, 2) bf16: torch's int4 kernels dequantize (q - 8) * scale + zero with a float
    zero, so ours, (q - z) * s, becomes zero = (8 - z) * s, rounded once to bf16 (the CUDA kernel
    reads the pairs as bf16 whatever the tensor's dtype: it must be bf16)."""
    scales, zeros = weight.scales.float(), weight.zeros.float()
    return torch.stack([scales, (8 - zeros) * scales], dim=2).to(torch.bfloat16).contiguous()


def _torch_int4_operand(codes: torch.Tensor) -> torch.Tensor:
    """The codes (N, K) as torch._convert_weight_to_int4pack wants them. Since torch 2.5: uint8
    (N, K / 2), two codes a byte, the even k in the high nibble (aten/src/ATen/native/cuda/int4mm.cu,
    matrix_to_m16n8k16_Bint4_layout, and the helper _group_quantize_tensor of test/test_linalg.py:
    `out[:, ::2] << 4 | out[:, 1::2]` for CUDA; the meta function checks the uint8 dtype). Before
    2.5: the (N, K) codes as int32."""
    if torch.__version__ >= (2, 5):
        return ((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous()
    return codes.to(torch.int32).contiguous()


def _prepare_torch_int4(inputs: QuantInputs) -> None:
    codes = inputs.weight.codes()
    packed = torch._convert_weight_to_int4pack(_torch_int4_operand(codes), INNER_K_TILES)
    inputs.torch_int4 = (packed, _torch_scales_and_zeros(inputs.weight))


def _torch_int4(inputs: QuantInputs) -> None:
    packed, scales_and_zeros = inputs.torch_int4
    inputs.anchor_out = torch._weight_int4pack_mm(inputs.x, packed, GROUP_SIZE, scales_and_zeros)


def _prepare_torch_int4_cpu(inputs: QuantInputs) -> None:
    codes = inputs.weight.codes().to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
    inputs.torch_int4 = (packed, _torch_scales_and_zeros(inputs.weight))


def _torch_int4_cpu(inputs: QuantInputs) -> None:
    packed, scales_and_zeros = inputs.torch_int4
    inputs.anchor_out = torch._weight_int4pack_mm_for_cpu(inputs.x, packed, GROUP_SIZE, scales_and_zeros)


def _prepare_int_mm(inputs: QuantInputs) -> None:
    inputs.accumulator = torch.empty(inputs.out_shape, dtype=torch.int32, device=inputs.x.device)
    inputs.anchor_out = inputs.x.new_empty(inputs.out_shape)


def _int_mm_scaled(inputs: QuantInputs) -> None:
    """W8A8 from torch's pieces, as a user would write it: per-token quantization (scale max|x| / 127,
    round half to even), the int8 product on cuBLAS (x row-major times the weight's transpose, the
    column-major operand its int8 kernels want), then the two scales, rounded once to bf16."""
    x = inputs.x
    x_scales = x.abs().amax(dim=1, keepdim=True).float().div_(127).clamp_(min=1e-30)   # (M, 1)
    codes = torch.round(x.float() / x_scales).clamp_(-127, 127).to(torch.int8)
    torch._int_mm(codes, inputs.weight.data.T, out=inputs.accumulator)
    torch.mul(inputs.accumulator * x_scales, inputs.weight.scales, out=inputs.anchor_out)


@dataclasses.dataclass(frozen=True)
class Anchor:
    name: str
    prepare: Callable[[QuantInputs], None]
    run: Run
    quantizes_activations: bool


ANCHORS = {
    "matmul": Anchor("bf16 matmul", _prepare_matmul, _matmul, quantizes_activations=False),
    "torch_int4": Anchor("torch._weight_int4pack_mm", _prepare_torch_int4, _torch_int4, quantizes_activations=False),
    "torch_int4_cpu": Anchor("torch int4 (CPU)", _prepare_torch_int4_cpu, _torch_int4_cpu,
                             quantizes_activations=False),
    "int_mm": Anchor("torch._int_mm + scaling", _prepare_int_mm, _int_mm_scaled, quantizes_activations=True),
}


def _torch_int4_takes(n: int, k: int) -> bool:
    """Whether torch's CUDA int4 kernel is in this build and accepts the shape (int4mm.cu: K a
    multiple of 16 * inner k-tiles, group 32..256, N a multiple of 8)."""
    return (hasattr(torch, "_weight_int4pack_mm") and hasattr(torch, "_convert_weight_to_int4pack")
            and k % (16 * INNER_K_TILES) == 0 and k % GROUP_SIZE == 0 and n % 8 == 0)


def _int_mm_takes(m: int, n: int, k: int) -> bool:
    """Whether torch._int_mm is in this build and its CUDA kernel accepts the shape (Blas.cpp,
    _int_mm_out_cuda: M > 16, K and N positive multiples of 8)."""
    return hasattr(torch, "_int_mm") and m > 16 and k % 8 == 0 and n % 8 == 0


def make_inputs(op: str, anchor: str, m: int, n: int, k: int, device: torch.device) -> QuantInputs:
    """A fresh input set: x, our quantized weight (from a random float32 weight scaled like a linear
    layer's), and the anchor's form of the same weight."""
    weight = OPS[op].quantize(torch.randn(n, k, device=device) * k ** -0.5)
    inputs = QuantInputs(torch.randn(m, k, device=device).to(torch.bfloat16), weight)
    ANCHORS[anchor].prepare(inputs)
    return inputs


# -- checks --------------------------------------------------------------------------------------

def _poison_next_allocation(shape: Tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
    """For a call that allocates its output: a NaN-filled block of the output's size, freed at once,
    is where torch's caching allocator most likely puts that output, so an unwritten output reads
    NaN. Only likely (the allocator may merge or pick another free block); what the check relies on
    is that the input set is fresh: no earlier correct result for these inputs exists anywhere in
    memory, so an output the call did not write cannot pass the comparison."""
    poison = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del poison


def _per_token_dequantized(x: torch.Tensor) -> torch.Tensor:
    """x quantized per token to int8 and back, in float64 then float32: scale max|row| / 127 (1 for a
    zero row), codes round(x / scale) clamped to [-127, 127] (quant.quantize_per_token's formula)."""
    scales = x.float().abs().amax(dim=-1, keepdim=True) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales)).double()
    return (torch.round(x.double() / scales).clamp(-127, 127) * scales).float()


def _check(attribute: str, quantizes_activations: bool, inputs: QuantInputs, run: Run) -> None:
    """The call wrote its output (poisoned first): finite, and within a few bf16 units (relative to
    the output's scale) of a float32 product with the dequantized weight."""
    buffer = getattr(inputs, attribute)
    if buffer is not None:
        buffer.fill_(float("nan"))
    else:
        _poison_next_allocation(inputs.out_shape, inputs.x.dtype, inputs.x.device)
    run(inputs)
    out = getattr(inputs, attribute)
    assert out is not None and tuple(out.shape) == inputs.out_shape, \
        f"{attribute} not written with shape {inputs.out_shape}"
    assert torch.isfinite(out).all(), f"{attribute} has non-finite values (not written?)"
    x = _per_token_dequantized(inputs.x) if quantizes_activations else inputs.x.float()
    expected = x @ quant.dequantize(inputs.weight).T
    scale = expected.abs().max().item()
    error = (out.float() - expected).abs().max().item()
    assert error <= 2 ** -6 * scale, f"{attribute} is off a float32 product by {error:.3g} (output scale {scale:.3g})"


# -- cases ---------------------------------------------------------------------------------------

def _targets(device: torch.device, op: str, anchor: str, m: int, n: int, k: int) -> List[Target]:
    if device.type != "cuda":
        if anchor != "torch_int4_cpu":
            return []
        return [Target("ratio", 1.0, "CPU >= 1.0x torch's int4 kernel at M <= 16")]
    targets = []   # (our time is the same against either anchor: a fraction target goes on one case only)
    if op == "w4a16" and anchor == "matmul":
        if m <= MEMORY_BOUND_ROWS and max(n, k) >= 8192:
            targets.append(Target("ratio", 3.0, "W4A16 >= 3.0x bf16 cuBLAS at M <= 16, N or K >= 8192"))
            # core's "fraction" is all of bytes_moved over the copy bandwidth; no target kind counts
            # the packed codes alone. At M <= 16 they are 93-95% of bytes_moved (scales and zeros add
            # 3 bytes a group of 128, 4.7% of the codes; x and out at most 2% on these layers), so
            # 75% here is about 71% of the copy bandwidth on the codes alone.
            targets.append(Target("fraction", 0.75, "W4A16 >= 75% of copy bandwidth at M <= 16, N or K >= 8192"))
        if m >= 512:
            targets.append(Target("ratio", 0.9, "W4A16 >= 0.9x bf16 cuBLAS at M >= 512"))
    if op == "w8a8" and m >= 1024:
        if anchor == "matmul":
            targets.append(Target("ratio", 1.5, "W8A8 >= 1.5x bf16 cuBLAS at M >= 1024"))
        if anchor == "int_mm":
            targets.append(Target("ratio", 1.0, "W8A8 >= 1.0x torch._int_mm + scaling at M >= 1024"))
    return targets


def _case(op: str, anchor: str, m: int, n: int, k: int, label: Optional[str], device: torch.device) -> Case:
    spec, anchor_spec = OPS[op], ANCHORS[anchor]
    description = (f"M={m} N={n} K={k}" + (f" g{GROUP_SIZE}" if op == "w4a16" else "")
                   + (f" ({label})" if label else ""))
    return Case(name=spec.name, description=description, dtype=torch.bfloat16, device=device,
                setup=functools.partial(make_inputs, op, anchor, m, n, k, device),
                run=spec.run, check=functools.partial(_check, "out", spec.quantizes_activations),
                anchor_name=anchor_spec.name, anchor_run=anchor_spec.run,
                anchor_check=functools.partial(_check, "anchor_out", anchor_spec.quantizes_activations),
                bytes_moved=spec.weight_bytes(n, k) + 2 * (m * k + m * n),   # + x read, out written (bf16)
                flops=None if m <= MEMORY_BOUND_ROWS else 2 * m * n * k,
                targets=tuple(_targets(device, op, anchor, m, n, k)))


def _cuda_cases(device: torch.device, layers: Sequence[Tuple[str, int, int]], rows: Sequence[int],
                w8a16_rows: Sequence[int]) -> List[Case]:
    cases = []
    for label, n, k in layers:   # W4A16
        anchors = ["matmul"] + (["torch_int4"] if _torch_int4_takes(n, k) else [])
        cases += [_case("w4a16", anchor, m, n, k, label, device) for m in rows for anchor in anchors]
    for label, n, k in layers:   # W8A8
        for m in rows:
            anchors = ["matmul"] + (["int_mm"] if _int_mm_takes(m, n, k) else [])
            cases += [_case("w8a8", anchor, m, n, k, label, device) for anchor in anchors]
    for label, n, k in layers:   # W8A16
        cases += [_case("w8a16", "matmul", m, n, k, label, device) for m in w8a16_rows]
    return cases


@register("quant")
def cases(device: torch.device, quick: bool) -> List[Case]:
    if device.type == "cuda":
        if quick:
            return _cuda_cases(device, [layer for layer in LAYERS if layer[0] in QUICK_LAYERS], QUICK_ROWS,
                               QUICK_W8A16_ROWS)
        return _cuda_cases(device, LAYERS, ROWS, W8A16_ROWS)
    if device.type != "cpu":
        return []
    anchors = (["torch_int4_cpu"] if hasattr(torch, "_weight_int4pack_mm_for_cpu") else []) + ["matmul"]
    shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
    return [_case("w4a16", anchor, m, n, k, None, device) for m, n, k in shapes for anchor in anchors]
