"""LoRA-fused matmul benchmark cases (issue 13), against what a user would run without us: one adapter on a
frozen 16-bit base weight (the forward and one training step), many adapters in one batch (serving, the
forward), and one adapter on an int4 base weight (QLoRA's forward). No bias and no dropout (Llama-3's
projections have no bias; PEFT's LoraConfig defaults to lora_dropout=0).

    lora.lora_linear          llmkernels.lora.lora_linear(x, W, A, B, scale): the shrink s = scale x Aᵀ,
                              then the base GEMM with the expand as extra k tiles, [x | s]·[W | B]ᵀ
        vs  base F.linear     F.linear(x, W): the base layer's GEMM alone (cuBLAS), what the fused layer
                              costs over a layer without an adapter
        vs  PEFT composition  F.linear(x, W) + F.linear(F.linear(x, A), B) * scale in x's dtype: PEFT's
                              lora.Linear.forward (result = base_layer(x); result = result +
                              lora_B(lora_A(dropout(x))) * scaling, dropout the identity at p = 0), five
                              kernels (three GEMMs, the scale, the sum); reference.lora_linear(upcast=False)
                              computes the same values (bitwise on the CPU, checked) but adds its own
                              validation and a host sync a call

    lora.lora_linear.fwd_bwd  one training step: the forward with x, A and B requiring grad (the weight
                              frozen), then torch.autograd.grad of the output for a given dy (M, N): dx, dA, dB
                              (nothing accumulates into .grad; every side is timed the same way, _train_step)
        vs  base F.linear     the frozen base layer's step: F.linear(x, W) with x requiring grad, then dx
                              (two GEMMs: the forward and dy W; no dW, the weight is frozen)
        vs  PEFT composition  the composition above through autograd

    lora.lora_linear.adapters multi-adapter serving, every side under torch.inference_mode():
                              lora_linear(x, W, A, B, scale, adapter_ids=ids, check_ids=False), row m adding
                              adapter ids[m]'s term; check_ids=False skips the device read (a host sync a
                              call) with which lora_linear checks that the ids lie in [-1, L): a server passes
                              ids it built, as adapter_ids() does here, and the check below tests the output
        vs  base F.linear     F.linear(x, W) alone, as above
        vs  PEFT mixed batch  PEFT's mixed-batch forward (LoraLayer._mixed_batch_forward, adapter_names=...)
                              with the rows' adapters on the device: out = F.linear(x, W), then for each
                              adapter l present (torch.unique(ids), one device read) rows = (ids == l).nonzero()
                              (one read each) and out[rows] += F.linear(F.linear(x[rows], A[l]), B[l]) * scale,
                              in x's dtype; reference.lora_linear(upcast=False) computes the same values
                              (bitwise on the CPU, checked at M = 1 and 128 with L = 4, 37 and 512 with
                              L = 32)

    lora.lora_linear.int4     one adapter on an int4 base weight (QLoRA's forward): lora_linear(x, W4, A, B,
                              scale), W4 = llmkernels.quant.quantize_int4(W, group_size=128) (an Int4Weight:
                              asymmetric, bf16 scales, uint8 zero points), quantized on the device in each
                              input set's setup
        vs  lora_linear bf16 base
                              our own lora_linear(x, W, A, B, scale) on the 16-bit W that W4 was quantized
                              from, the same x, A and B

x (M, K), W (N, K), A (r, K), B (N, r), dy (M, N), all drawn with torch.randn in the case's dtype on the
device, the weights scaled like linear layers (W and A by K^-1/2, B by r^-1/2, not PEFT's zero B, so that
the adapter's term is as large as the base's and a kernel that drops it fails the check), scale =
alpha / r with alpha = 2r (reference.scaling). Multi-adapter: L adapters drawn the same way, A (L, r, K) and
B (L, N, r), one scale; ids int32 (M,) on the device (adapter_ids(), seeded, the same in every input set):
rows dealt round-robin in a shuffled order to a shuffle of the L adapters, so every row's adapter is
uniform over the L, the rows are not sorted by adapter, and min(M, L) adapters are used (all L once
M >= L, in counts within one of each other).

CUDA, bf16, Llama-3-8B's projections (K -> N): qkv 4096 -> 6144, o 4096 -> 4096, gate/up 4096 -> 28672
(2 x 14336), down 14336 -> 4096; ranks 16 and 64.
    forward: M in 1, 16, 128, 512, 2048, 8192, each against both anchors: 96 cases.
    forward+backward: M in 2048 and 8192, each against both anchors: 32 cases.
    multi-adapter, each against both anchors, a subset of the issue's grid (the four layers x ranks 16 and
        64 x M in 1, 16, 64, 2048 x L in 1, 4, 32 would be 96 configurations, 192 cases): the four layers at
        r = 16 and L = 32 with M in 1, 16, 64 (decode); qkv at r = 16 with L = 1 and 4, and at r = 64 with
        L = 32, M in 1, 16, 64; at M = 2048 qkv r = 16 with L = 4 and 32, qkv r = 64 L = 32 and gate/up
        r = 16 L = 32: 25 configurations, 50 cases.
    int4 base: qkv and gate/up at r = 16, M in 1, 16, 2048, against the bf16-base lora_linear: 6 cases.
    Together 184 cases, roughly 4-6.5 min on an H100 with setup and checks (an estimate, not measured: about
        1 s a case of setup, checks and warm-up, plus the timed calls, at most 200 a function; the PEFT mixed
        batch's host syncs, one per adapter present, make its call about 1-3 ms at L = 32, 0.2-0.6 s of
        timed calls).
    --quick: forward o r=16 M=16 against the base GEMM, qkv r=16 M=2048 against both anchors, forward+
        backward qkv r=16 M=2048 against the frozen base layer, multi-adapter qkv r=16 M=16 L=32 against
        both anchors, int4 base qkv r=16 M=16: 7 cases, an estimated 8-15 s on an H100.
CPU: a scaled-down layer (K = N = 1024, r = 16) against the PEFT composition: the forward in bf16 and in
float32 at M = 128 and 512, the forward+backward in bf16 at M = 128; against the PEFT mixed batch the
multi-adapter forward in bf16 at M = 128 with L = 4 (--quick: the bf16 forward at M = 128, the
forward+backward and the multi-adapter forward). Building the CUDA list touches no device (torch without
CUDA builds it too).

Throughput: M <= 16 reads the weight once and does little else: effective GB/s (flops=None) of
bytes_moved (the forward: W, A, B and x read, out written; multi-adapter: the min(M, L) adapters' A and B
the rows use and the ids too; int4: W4's packed codes, N K / 2 bytes, and its scales and zero points,
3 N K / 128 bytes, instead of W), against the copy bandwidth. Larger M in TFLOP/s of our work,
2 M (N K + r (K + N)) for the forward (every row one adapter: the same for multi-adapter and int4),
4 M N K + 6 M r (K + N) for the training step (its forward, dx = dy W + (scale dy B) A, dA, dB), against the
bf16 matmul peak. (The training step's bytes_moved, which only sizes the input-set rotation: W, A and B read
twice, x and dy twice, out and dx written, the rest once.)

Targets (printed under the table, not asserted; ratio = the anchor's time / ours):
    forward, r = 16, M >= 512: within 8% of the base GEMM alone (ratio >= 1/1.08 = 0.926)
    forward+backward, every case: at most 1.15x the frozen base layer's forward+backward (ratio >= 1/1.15
        = 0.870)
    multi-adapter decode, M <= 64 and L = 32, every layer and rank: within 15% of the base GEMM alone
        (ratio >= 1/1.15 = 0.870)
    int4 base, every case: at most 1.2x the bf16-base lora_linear's time (ratio >= 1/1.2 = 0.833)
    CPU forward, M >= 128: the fused C++ forward at least 0.8x the speed of the PEFT composition (ratio >= 0.8).
        Measured on a 2-core AVX2 EPYC with one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1); the two
        alternating, medians of 30 calls each): bf16 2.5x at M = 128 and 2.6x at 512 (13 vs 32 ms, 51 vs
        131 ms: torch's bf16 CPU matmul is slow without AVX-512 BF16), float32 0.31x and 0.27x (19 vs 5.9 ms,
        75 vs 21 ms: torch's float32 GEMMs are MKL's, our CPU kernel is the GEMM core's); this runner with
        OMP_NUM_THREADS=1 measured 2.2x, 1.9x, 0.26x and 0.23x on the same four cases. With two threads
        while other jobs held the cores the medians swung from 1.2x to 2.3x (bf16) and 0.7x to 2.2x
        (float32), every case flagged WIDE SPREAD: trust a run on quiet cores only.
    The CPU multi-adapter forward has no target; one single-thread run on this runner while other jobs held
        the cores (load 1.8 to 2.4 on 2) measured 26 vs 49 ms (1.9x), the single-adapter bf16 forward
        at M = 128 13 vs 33 ms in the same run; a loop over L = 1 to 32 on those loaded cores gave 13 to
        26 ms with no trend in L.

Checks (each side on a fresh input set, before anything is timed): every side allocates its outputs, so
blocks of their sizes are poisoned with NaN first (core.poison_next_allocations; what the check relies on is
that the input set is fresh). The output must then be finite everywhere and, on up to CHECK_ROWS rows
spread over M, within TOLERANCE (2^-6) of its scale (max |oracle|) of a float32 oracle: the base layer's
float32 F.linear, or reference.lora_linear in float32 (upcast=True) for ours and the PEFT composition
(multi-adapter: with adapter_ids=ids on those rows; int4: given W4 itself, which it dequantizes in
float32, where the bf16-base anchor's oracle gets W).
Training: the output and every gradient must be finite everywhere; the output and dx are compared on the
CHECK_ROWS rows (the float32 oracle through autograd on those rows), dA and dB in full (sums over all M
rows: the oracle's gradients summed over chunks of ORACLE_CHUNK_ROWS rows), each within 2^-6 of its own
scale. Measured on the CPU with check_errors() (bf16, K = N = 1024 at r = 16 and M = 1 and 128, r = 64 and
M = 512, and K = 520, N = 1032, r = 16, M = 37; the CUDA kernels emulated at K = 264, N = 136, M = 1 and
37), in units of 2^-6 of each tensor's scale, largest over the output and the gradients: ours 0.28
(emulated 0.20), the PEFT composition 0.39, the base layer 0.23; float32 cases below 0.001. A side that
drops the adapter is off by about 0.9 of the output's scale, a scale 5% too large by 3 units, a dA 3%
too large by 2 units. Multi-adapter (CPU, bf16: K = N = 1024, r = 16, L = 4 at M = 1 and 128, r = 64,
L = 32, M = 512, and K = 520, N = 1032, r = 16, L = 32, M = 37; the CUDA kernels emulated at K = 264,
N = 136, r = 16, M = 1 and 37, L = 4 and 32): ours 0.24 (emulated 0.21), the PEFT mixed batch 0.33, the
base layer 0.22; a side that gives the rows the wrong adapters (ids + 1 mod L) is off by 1.3 of the
output's scale. int4 (CPU, bf16, r = 16: K = N = 1024 at M = 1 and 37, K = 512, N = 1032, M = 130; emulated
at K = 256, N = 136, M = 1 and 37): ours 0.23 (emulated 0.18), the bf16-base anchor 0.24; each side is off
by 2.5 to 2.9 units from the other side's oracle (W4 for W), so the check tells the two weights apart.
"""
import dataclasses
import functools
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import lora, quant
from ..reference import lora as reference
from .core import Case, Check, Run, Target, poison_next_allocations, register, spread_rows

MEMORY_BOUND_ROWS = 16       # M <= this: GB/s of bytes_moved; above, TFLOP/s
CHECK_ROWS = 256             # rows of the output and of dx compared with the float32 oracle
ORACLE_CHUNK_ROWS = 2048     # rows the oracle differentiates at once for dA and dB (bounds its float32 copies)
TOLERANCE = 2 ** -6          # of each compared tensor's scale (max |oracle|), for every side
ALPHA_PER_RANK = 2           # scale = alpha / r = 2
FORWARD_SLOWDOWN = 1.08      # target: the r=16 forward within 8% of the base GEMM at M >= 512
TRAIN_SLOWDOWN = 1.15        # target: the training step at most 1.15x the frozen base layer's
CPU_RATIO = 0.8              # target: the CPU forward at least 0.8x the PEFT composition's speed at M >= 128
SERVING_SLOWDOWN = 1.15      # target: multi-adapter decode (M <= DECODE_ROWS, L = 32) within 15% of the base GEMM
DECODE_ROWS = 64             # M <= this: decode, for the multi-adapter target
SERVING_ADAPTERS = 32        # L of the multi-adapter target
INT4_SLOWDOWN = 1.2          # target: the int4-base forward at most 1.2x the bf16-base lora_linear's time
INT4_GROUP_SIZE = 128        # quantize_int4's group along K for the int4 base weight
IDS_SEED = 13                # the multi-adapter rows' adapters (adapter_ids()), the same in every input set


@dataclasses.dataclass(frozen=True)
class Layer:
    label: str
    out_features: int   # N
    in_features: int    # K

    def __str__(self) -> str:
        return f"{self.label} {self.in_features}->{self.out_features}"


QKV = Layer("8B qkv", 6144, 4096)
O_PROJ = Layer("8B o", 4096, 4096)
GATE_UP = Layer("8B gate/up", 28672, 4096)
DOWN = Layer("8B down", 4096, 14336)
CPU_LAYER = Layer("scaled down", 1024, 1024)

LAYERS = (QKV, O_PROJ, GATE_UP, DOWN)

Config = Tuple[Layer, int, int, torch.dtype]              # (layer, rank, M, dtype)
ServingConfig = Tuple[Layer, int, int, int, torch.dtype]  # (layer, rank, M, adapters L, dtype)
BF16, FP32 = torch.bfloat16, torch.float32
CUDA_FORWARD = [(layer, rank, m, BF16) for layer in LAYERS for rank in (16, 64) for m in (1, 16, 128, 512, 2048, 8192)]
CUDA_TRAIN = [(layer, rank, m, BF16) for layer in LAYERS for rank in (16, 64) for m in (2048, 8192)]
CUDA_SERVING = ([(layer, 16, m, 32, BF16) for layer in LAYERS for m in (1, 16, 64)]
                + [(QKV, 16, m, adapters, BF16) for adapters in (1, 4) for m in (1, 16, 64)]
                + [(QKV, 64, m, 32, BF16) for m in (1, 16, 64)]
                + [(QKV, 16, 2048, 4, BF16), (QKV, 16, 2048, 32, BF16), (QKV, 64, 2048, 32, BF16),
                   (GATE_UP, 16, 2048, 32, BF16)])
CUDA_INT4 = [(layer, 16, m, BF16) for layer in (QKV, GATE_UP) for m in (1, 16, 2048)]
CPU_FORWARD = [(CPU_LAYER, 16, m, dtype) for dtype in (BF16, FP32) for m in (128, 512)]
CPU_TRAIN = [(CPU_LAYER, 16, 128, BF16)]      # --quick too
CPU_SERVING = [(CPU_LAYER, 16, 128, 4, BF16)]  # --quick too
QUICK_CPU_FORWARD = CPU_FORWARD[:1]


# -- inputs ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoraInputs:
    x: torch.Tensor                    # (M, K); requires grad in a training step
    weight: torch.Tensor               # (N, K), frozen
    lora_a: torch.Tensor               # (r, K), (L, r, K) with adapter_ids; requires grad in a training step
    lora_b: torch.Tensor               # (N, r), (L, N, r) with adapter_ids; requires grad in a training step
    scale: float
    dy: Optional[torch.Tensor] = None                  # (M, N): the output's gradient in a training step
    adapter_ids: Optional[torch.Tensor] = None         # int32 (M,): row m's adapter, in a multi-adapter case
    weight_int4: Optional[quant.Int4Weight] = None     # weight quantized, in an int4-base case
    out: Optional[torch.Tensor] = None                 # the last call's output (whichever side ran)
    grads: Optional[Tuple[torch.Tensor, ...]] = None   # the last step's gradients: (dx, dA, dB), or (dx,)


def adapter_ids(m: int, adapters: int, device: torch.device) -> torch.Tensor:
    """int32 (M,) on the device, the same for every call with these sizes: rows dealt round-robin to L
    slots in a shuffled order (counts within one of each other), the slots a shuffle of the L adapters.
    Every row's adapter is uniform over the L, the rows are not sorted by adapter, and min(M, L) distinct
    adapters are used: all L once M >= L (an i.i.d. draw would leave some out)."""
    generator = torch.Generator().manual_seed(IDS_SEED)
    adapter_of_slot = torch.randperm(adapters, generator=generator)
    slot_of_row = torch.randperm(m, generator=generator) % adapters
    return adapter_of_slot[slot_of_row].to(device=device, dtype=torch.int32)


def make_inputs(layer: Layer, rank: int, m: int, dtype: torch.dtype, backward: bool, device: torch.device, *,
                adapters: Optional[int] = None, int4: bool = False) -> LoraInputs:
    """A fresh input set, drawn directly in `dtype` on the device (no float32 copy of the weight); with
    `backward` the leaves x, A and B require grad and dy is drawn. `adapters`: L stacked adapters, A (L, r, K)
    and B (L, N, r), and adapter_ids(); `int4`: the weight also quantized (quantize_int4, on the device)."""
    n, k = layer.out_features, layer.in_features
    randn = functools.partial(torch.randn, device=device, dtype=dtype)
    stack = () if adapters is None else (adapters,)
    inputs = LoraInputs(x=randn(m, k), weight=randn(n, k).mul_(k ** -0.5),
                        lora_a=randn(*stack, rank, k).mul_(k ** -0.5), lora_b=randn(*stack, n, rank).mul_(rank ** -0.5),
                        scale=reference.scaling(ALPHA_PER_RANK * rank, rank))
    if adapters is not None:
        inputs.adapter_ids = adapter_ids(m, adapters, device)
    if int4:
        inputs.weight_int4 = quant.quantize_int4(inputs.weight, group_size=INT4_GROUP_SIZE)
    if backward:
        for leaf in (inputs.x, inputs.lora_a, inputs.lora_b):
            leaf.requires_grad_()
        inputs.dy = randn(m, n)
    return inputs


# -- the sides: ours and the anchors ---------------------------------------------------------------

def _ours(inputs: LoraInputs) -> torch.Tensor:
    return lora.lora_linear(inputs.x, inputs.weight, inputs.lora_a, inputs.lora_b, inputs.scale)


def _peft(inputs: LoraInputs) -> torch.Tensor:
    """PEFT's lora.Linear.forward without dropout: the base layer, then the adapter's two linears and the
    scale, each in x's dtype (one rounding each), added to the base output."""
    x = inputs.x
    return F.linear(x, inputs.weight) + F.linear(F.linear(x, inputs.lora_a), inputs.lora_b) * inputs.scale


def _base(inputs: LoraInputs) -> torch.Tensor:
    return F.linear(inputs.x, inputs.weight)


def _ours_serving(inputs: LoraInputs) -> torch.Tensor:
    """check_ids=False: no device read of the ids' range (a host sync a call); adapter_ids() made them."""
    return lora.lora_linear(inputs.x, inputs.weight, inputs.lora_a, inputs.lora_b, inputs.scale,
                            adapter_ids=inputs.adapter_ids, check_ids=False)


def _peft_mixed_batch(inputs: LoraInputs) -> torch.Tensor:
    """PEFT's mixed-batch forward (LoraLayer._mixed_batch_forward) with the rows' adapters on the device: the
    base layer, then for each adapter present its rows gathered, its two linears and the scale in x's dtype,
    added into those rows of the base output."""
    x, ids = inputs.x, inputs.adapter_ids
    out = F.linear(x, inputs.weight)
    for adapter in torch.unique(ids).tolist():   # one device read: the adapters present
        rows = (ids == adapter).nonzero().squeeze(1)
        out[rows] += F.linear(F.linear(x[rows], inputs.lora_a[adapter]), inputs.lora_b[adapter]) * inputs.scale
    return out


def _ours_int4(inputs: LoraInputs) -> torch.Tensor:
    return lora.lora_linear(inputs.x, inputs.weight_int4, inputs.lora_a, inputs.lora_b, inputs.scale)


@dataclasses.dataclass(frozen=True)
class Side:
    name: str
    forward: Callable[[LoraInputs], torch.Tensor]
    adapter: bool             # adds the adapter's term (ours, PEFT); False: the base layer alone
    int4_base: bool = False   # its base weight is weight_int4 (the oracle dequantizes it), not weight

    def leaves(self, inputs: LoraInputs) -> Tuple[torch.Tensor, ...]:
        """What a training step of this side differentiates with respect to, in the order of `grads`."""
        return (inputs.x, inputs.lora_a, inputs.lora_b) if self.adapter else (inputs.x,)


OURS = Side("llmkernels lora_linear", _ours, adapter=True)
ANCHORS = {"base": Side("base F.linear", _base, adapter=False),
           "peft": Side("PEFT composition", _peft, adapter=True)}
OURS_SERVING = Side("llmkernels lora_linear", _ours_serving, adapter=True)
SERVING_ANCHORS = {"base": ANCHORS["base"], "peft": Side("PEFT mixed batch", _peft_mixed_batch, adapter=True)}
OURS_INT4 = Side("llmkernels lora_linear", _ours_int4, adapter=True, int4_base=True)
INT4_ANCHOR = Side("lora_linear bf16 base", _ours, adapter=True)
GRAD_NAMES = ("dx", "d lora_a", "d lora_b")


def _forward(side: Side, inputs: LoraInputs) -> None:
    inputs.out = None                       # the last call's output is not held through this one
    inputs.out = side.forward(inputs)


def _serve(side: Side, inputs: LoraInputs) -> None:
    """The forward as a server runs it, under torch.inference_mode() (lora_linear with adapter_ids is
    forward-only), every side alike."""
    with torch.inference_mode():
        _forward(side, inputs)


def _train_step(side: Side, inputs: LoraInputs) -> None:
    """One training step: the side's forward through autograd, then the gradients of its leaves for dy.
    torch.autograd.grad: nothing accumulates into .grad, and the graph is freed with the step."""
    inputs.out = inputs.grads = None        # the last step's tensors are not held through this one
    inputs.out = side.forward(inputs)
    inputs.grads = torch.autograd.grad(inputs.out, side.leaves(inputs), inputs.dy)


# -- checks ----------------------------------------------------------------------------------------

def oracle(inputs: LoraInputs, weight, rows: torch.Tensor, adapter: bool,
           with_grad: bool) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """float32 (out on `rows`, gradients): reference.lora_linear in float32 (upcast=True) for a side with the
    adapter (the rows' adapter_ids with them in a multi-adapter case), F.linear in float32 for the base layer
    alone, on x's `rows`; `weight` is the base weight in float32 (converted once by the caller), or an
    Int4Weight (which the reference dequantizes in float32). With `with_grad`, the gradients of
    <out, dy[rows]> with respect to x[rows] and, with the adapter, A and B (those two: the rows' share of the
    sums over M)."""
    x = inputs.x.detach()[rows].float().requires_grad_(with_grad)
    leaves: Tuple[torch.Tensor, ...] = (x,)
    with torch.set_grad_enabled(with_grad):
        if adapter:
            a, b = (t.detach().float().requires_grad_(with_grad) for t in (inputs.lora_a, inputs.lora_b))
            ids = None if inputs.adapter_ids is None else inputs.adapter_ids[rows]
            out = reference.lora_linear(x, weight, a, b, inputs.scale, adapter_ids=ids, out_dtype=torch.float32)
            leaves = (x, a, b)
        else:
            out = F.linear(x, weight)
    if not with_grad:
        return out, ()
    return out.detach(), torch.autograd.grad(out, leaves, inputs.dy[rows].float())


def _compared(side: Side, inputs: LoraInputs, backward: bool) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, got, float32 oracle) of the call just run: the output (and dx) on up to CHECK_ROWS rows; in a
    training step with the adapter, dA and dB in full (the oracle's summed over chunks of rows)."""
    m, device = inputs.x.shape[0], inputs.x.device
    weight = inputs.weight_int4 if side.int4_base else inputs.weight.detach().float()
    rows = spread_rows(m, CHECK_ROWS, device)
    out, grads = oracle(inputs, weight, rows, side.adapter, backward)
    compared = [("out", inputs.out.detach()[rows], out)]
    if not backward:
        return compared
    compared.append(("dx", inputs.grads[0][rows], grads[0]))
    if side.adapter:
        totals = [torch.zeros_like(g) for g in grads[1:]]
        for start in range(0, m, ORACLE_CHUNK_ROWS):
            chunk = torch.arange(start, min(m, start + ORACLE_CHUNK_ROWS), device=device)
            for total, grad in zip(totals, oracle(inputs, weight, chunk, True, True)[1][1:]):
                total += grad
        compared += [(name, got, expected) for name, got, expected in zip(GRAD_NAMES[1:], inputs.grads[1:], totals)]
    return compared


def check_errors(side: Side, inputs: LoraInputs, backward: bool) -> List[Tuple[str, float]]:
    """(name, max |got - oracle| / max |oracle|) of every tensor the check compares, for the call just run
    (the check asserts each is at most TOLERANCE)."""
    errors = []
    for name, got, expected in _compared(side, inputs, backward):
        scale = expected.abs().max().item()
        errors.append((name, (got.float() - expected).abs().max().item() / scale if scale > 0 else 0.0))
    return errors


def _check(side: Side, backward: bool, inputs: LoraInputs, run: Run) -> None:
    """The call wrote its output (and, in a training step, its gradients), their sizes poisoned with NaN
    first: the right shapes and dtype, finite everywhere, and within TOLERANCE of the float32 oracle on the
    entries _compared() picks."""
    m, n = inputs.x.shape[0], inputs.weight.shape[0]
    expected = [("out", (m, n))]
    if backward:
        expected += [(name, tuple(leaf.shape)) for name, leaf in zip(GRAD_NAMES, side.leaves(inputs))]
    poison_next_allocations([shape for _, shape in expected], inputs.x.dtype, inputs.x.device)
    run(inputs)
    written = [inputs.out] + list(inputs.grads if backward and inputs.grads is not None else [])
    assert len(written) == len(expected), f"{side.name} wrote {len(written)} of {len(expected)} tensors"
    for (name, shape), tensor in zip(expected, written):
        assert tensor is not None and tuple(tensor.shape) == shape and tensor.dtype == inputs.x.dtype, \
            f"{side.name}: {name} not written as {inputs.x.dtype} {shape}"
        assert torch.isfinite(tensor).all(), f"{side.name}: {name} has non-finite values (not written?)"
    for name, error in check_errors(side, inputs, backward):
        assert error <= TOLERANCE, \
            f"{side.name}: {name} is off the float32 oracle by {error:.3g} of its scale (tolerance {TOLERANCE:.3g})"


def _side(side: Side, backward: bool, serving: bool = False) -> Tuple[Run, Check]:
    """The timed function and its check for a side: the forward alone (under torch.inference_mode() with
    `serving`), or the training step."""
    run = functools.partial(_train_step if backward else _serve if serving else _forward, side)
    return run, functools.partial(_check, side, backward)


# -- cases -----------------------------------------------------------------------------------------

def _targets(device: torch.device, rank: int, m: int, anchor: str, backward: bool) -> List[Target]:
    if device.type != "cuda":
        if anchor == "peft" and not backward and m >= 128:
            return [Target("ratio", CPU_RATIO, f"CPU: the fused C++ forward at least {CPU_RATIO}x the speed of the "
                                               "unfused PEFT composition at M >= 128")]
        return []
    if anchor != "base":
        return []
    if backward:
        return [Target("ratio", 1 / TRAIN_SLOWDOWN,
                       f"training forward+backward at most {TRAIN_SLOWDOWN}x the frozen base layer's forward+backward "
                       f"(ratio >= {1 / TRAIN_SLOWDOWN:.3f})")]
    if rank == 16 and m >= 512:
        return [Target("ratio", 1 / FORWARD_SLOWDOWN,
                       f"fused r=16 forward within {FORWARD_SLOWDOWN - 1:.0%} of the base GEMM alone at M >= 512 "
                       f"(ratio >= {1 / FORWARD_SLOWDOWN:.3f})")]
    return []


def _work(layer: Layer, rank: int, m: int, dtype: torch.dtype, backward: bool, *, adapters: Optional[int] = None,
          int4: bool = False) -> Tuple[int, Optional[int]]:
    """(bytes_moved, flops) of our side (the module docstring says what each counts); `adapters`: the L of a
    multi-adapter case, `int4`: the base weight quantized."""
    n, k = layer.out_features, layer.in_features
    adapter = rank * (k + n)
    if backward:
        return dtype.itemsize * (2 * n * k + 3 * adapter + 3 * m * k + 3 * m * n), 4 * m * n * k + 6 * m * adapter
    flops = 2 * m * (n * k + adapter)
    # int4: the packed codes (half a byte an element), bf16 scales and uint8 zeros (3 bytes a group and row)
    weight = n * k // 2 + 3 * n * (k // INT4_GROUP_SIZE) if int4 else dtype.itemsize * n * k
    used, ids = (1, 0) if adapters is None else (min(m, adapters), 4 * m)   # adapter_ids() uses min(M, L)
    bytes_moved = weight + dtype.itemsize * (used * adapter + m * k + m * n) + ids
    return bytes_moved, None if m <= MEMORY_BOUND_ROWS else flops


def _case(config: Config, anchor: str, backward: bool, device: torch.device) -> Case:
    layer, rank, m, dtype = config
    run, check = _side(OURS, backward)
    anchor_run, anchor_check = _side(ANCHORS[anchor], backward)
    bytes_moved, flops = _work(layer, rank, m, dtype, backward)
    return Case(name="lora.lora_linear.fwd_bwd" if backward else "lora.lora_linear",
                description=f"{layer} r={rank} M={m}", dtype=dtype, device=device,
                setup=functools.partial(make_inputs, layer, rank, m, dtype, backward, device),
                run=run, check=check, anchor_name=ANCHORS[anchor].name, anchor_run=anchor_run,
                anchor_check=anchor_check, bytes_moved=bytes_moved, flops=flops,
                targets=tuple(_targets(device, rank, m, anchor, backward)))


def _cases(configs: Sequence[Config], anchors: Sequence[str], device: torch.device, *,
           backward: bool = False) -> List[Case]:
    return [_case(config, anchor, backward, device) for config in configs for anchor in anchors]


def _serving_case(config: ServingConfig, anchor: str, device: torch.device) -> Case:
    layer, rank, m, adapters, dtype = config
    run, check = _side(OURS_SERVING, False, serving=True)
    anchor_run, anchor_check = _side(SERVING_ANCHORS[anchor], False, serving=True)
    bytes_moved, flops = _work(layer, rank, m, dtype, False, adapters=adapters)
    targets = []
    if device.type == "cuda" and anchor == "base" and m <= DECODE_ROWS and adapters == SERVING_ADAPTERS:
        targets.append(Target("ratio", 1 / SERVING_SLOWDOWN,
                              f"multi-adapter decode (M <= {DECODE_ROWS}, {SERVING_ADAPTERS} adapters) within "
                              f"{SERVING_SLOWDOWN - 1:.0%} of the base GEMM alone "
                              f"(ratio >= {1 / SERVING_SLOWDOWN:.3f})"))
    return Case(name="lora.lora_linear.adapters", description=f"{layer} r={rank} M={m} L={adapters}", dtype=dtype,
                device=device, setup=functools.partial(make_inputs, layer, rank, m, dtype, False, device,
                                                       adapters=adapters),
                run=run, check=check, anchor_name=SERVING_ANCHORS[anchor].name, anchor_run=anchor_run,
                anchor_check=anchor_check, bytes_moved=bytes_moved, flops=flops, targets=tuple(targets))


def _serving_cases(configs: Sequence[ServingConfig], anchors: Sequence[str], device: torch.device) -> List[Case]:
    return [_serving_case(config, anchor, device) for config in configs for anchor in anchors]


def _int4_case(config: Config, device: torch.device) -> Case:
    layer, rank, m, dtype = config
    run, check = _side(OURS_INT4, False)
    anchor_run, anchor_check = _side(INT4_ANCHOR, False)
    bytes_moved, flops = _work(layer, rank, m, dtype, False, int4=True)
    target = Target("ratio", 1 / INT4_SLOWDOWN, f"int4-base forward at most {INT4_SLOWDOWN}x the bf16-base "
                                                f"lora_linear's time (ratio >= {1 / INT4_SLOWDOWN:.3f})")
    return Case(name="lora.lora_linear.int4", description=f"{layer} r={rank} M={m} group {INT4_GROUP_SIZE}",
                dtype=dtype, device=device,
                setup=functools.partial(make_inputs, layer, rank, m, dtype, False, device, int4=True),
                run=run, check=check, anchor_name=INT4_ANCHOR.name, anchor_run=anchor_run, anchor_check=anchor_check,
                bytes_moved=bytes_moved, flops=flops, targets=(target,) if device.type == "cuda" else ())


@register("lora")
def cases(device: torch.device, quick: bool) -> List[Case]:
    """The lists in the module docstring; building them allocates nothing and touches no device."""
    if device.type == "cuda":
        if quick:
            return (_cases([(O_PROJ, 16, 16, BF16)], ["base"], device)
                    + _cases([(QKV, 16, 2048, BF16)], ["base", "peft"], device)
                    + _cases([(QKV, 16, 2048, BF16)], ["base"], device, backward=True)
                    + _serving_cases([(QKV, 16, 16, 32, BF16)], ["base", "peft"], device)
                    + [_int4_case((QKV, 16, 16, BF16), device)])
        return (_cases(CUDA_FORWARD, ["base", "peft"], device)
                + _cases(CUDA_TRAIN, ["base", "peft"], device, backward=True)
                + _serving_cases(CUDA_SERVING, ["base", "peft"], device)
                + [_int4_case(config, device) for config in CUDA_INT4])
    if device.type != "cpu":
        return []
    return (_cases(QUICK_CPU_FORWARD if quick else CPU_FORWARD, ["peft"], device)
            + _cases(CPU_TRAIN, ["peft"], device, backward=True)
            + _serving_cases(CPU_SERVING, ["peft"], device))
