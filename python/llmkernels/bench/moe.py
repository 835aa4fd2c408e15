"""Mixture-of-Experts benchmark cases (issue 12): the routed experts' FFN forward, bf16, against what a
user would run without us.

    moe.moe_ffn    llmkernels.moe.moe_ffn(x, w_gate_up, w_down, weights, expert_ids), swiglu, forward only
        vs  reference loop     llmkernels.reference.moe.moe_ffn(..., upcast=False): the per-expert PyTorch
                               loop (gather, two bf16 matmuls, silu * up, weighted index_add), bf16 throughout
        vs  torch._grouped_mm  the sorted-by-expert path a user writes with torch's grouped GEMM
                               (_grouped_mm_moe): stable sort of the (token, slot) pairs by expert, group ends
                               by searchsorted (no host sync), gather x, _grouped_mm for gate/up, silu * up,
                               _grouped_mm for down, scale by the routing weights and index_add_ back
                               (float32), one rounding to bf16; all of it timed
        vs  dense bf16 GEMM    the same FLOPs as two plain matmuls of the routed work's shapes:
                               (T k, H) @ (2F, H)ᵀ and (T k, F) @ (H, F)ᵀ (one expert's weights, cuBLAS)

torch._grouped_mm (checked against torch 2.13's schema, aten/src/ATen/native/GroupedMMUtils.h and
test/test_matmul_cuda.py::test_grouped_gemm_2d_3d): _grouped_mm(mat_a, mat_b, offs=None, bias=None,
out_dtype=None). The 2-D x 3-D form used here: mat_a (M, K) rows sorted by group, mat_b (G, K, N) (the
weights (G, N, K) in nn.Linear layout passed as .transpose(-2, -1), a column-major view, no copy), offs
int32 (G,) on the device, the cumulative END row of each group (offs[g] = rows of groups 0..g; empty
groups repeat the previous end), out (M, N). Strides must be 16-byte aligned (H, F multiples of 8 here).
On sm90/sm100 with bf16 in and out it runs CUTLASS with no host sync; on other GPUs torch's fallback
loops over the groups with one mm each after copying offs to the host (a sync): the anchor still runs,
it is just that loop. The case is left out only where torch has no _grouped_mm (decided when the list is
built, without touching CUDA); if it raised on some device, its check fails and the runner records an
error for that case alone.

CUDA shapes (E experts, H hidden, F expert FFN, top-k): Mixtral-8x7B (8, 4096, 14336, 2), Qwen3-30B-A3B
(128, 2048, 768, 8), DeepSeek-V3-like (256, 7168, 2048, 8), T in 1, 64, 512, 4096, 16384, uniform and
skewed routing, each against all three anchors: 90 cases (60 without torch._grouped_mm), roughly
10-15 min on an H100 (estimated, not measured). --quick: Qwen3 at T = 64 and 4096 (4096 also skewed),
Mixtral at T = 1 and 4096: 15 cases (estimated 30-45 s on an H100, setup included; not measured).
CPU: a scaled-down Qwen3 (E=16, H=512, F=256, top-4) at T = 512 (uniform and skewed) and 64, against the
reference loop only (--quick: T = 512 uniform).

Memory: weights are drawn with torch.randn directly in bf16 on the device (no float32 copy) and scaled
like linear layers (w_gate_up by H^-1/2, w_down by F^-1/2). Mixtral's weights are 2.8 GB, Qwen3's 1.2 GB,
DeepSeek-like 22.5 GB an input set; the DeepSeek-like cases at T = 16384 add ~10-13 GB of intermediates
(ours: the float32 down-projection rows; the grouped_mm anchor: the float32 weighted rows), so they need
roughly 40 GB of GPU memory. Whether the GPU has that cannot be known without initializing CUDA, so the
full list keeps them on every GPU: on a smaller GPU they fail with an out-of-memory error that the runner
records for those cases alone (--quick never includes them).

Routing: router logits drawn on the CPU from a generator seeded by the case (the same routing for
every input set of a case), routed once when the list is built (softmax top-k, renormalized:
reference.route's result, see routing()) and cached; setup copies it to the device. Uniform: standard
normal logits. Skewed: a Zipf-like bias, logit -= ZIPF_EXPONENT * log(rank + 1) over a seeded random
ranking of the experts, so that the prior of the rank-r expert is proportional to 1 / (r + 1): on 4096
tokens the top 10% of experts take 72% of the (token, slot) pairs for Qwen3 and 88% for the
DeepSeek-like shape (measured on the CPU with this routing).

Throughput: T >= 512 in TFLOP/s of the routed work, 2 T k (2F H + H F) for swiglu, against the bf16
matmul peak. T <= 64 in effective GB/s (flops=None): bytes_moved counts the weights of the experts that
get at least one token (counted on the case's routing when the list is built), plus x read and out
written (bf16) and the routing (weights, ids); on the CUDA shapes the weights are over 99.8% of it at
T <= 64. Our intermediates (the gathered and activated rows) are not counted. The dense anchor reads one
expert's weights, so at T <= 64 it is no yardstick (no target there); it is one at T >= 4096.

Targets (printed under the table, not asserted):
    forward at T >= 4096: >= 0.85x the dense bf16 GEMM of the same FLOPs
    forward at every T: >= 1.0x the torch._grouped_mm path
    decode (T <= 64): >= 70% of the copy bandwidth on the expert weights read (core's "fraction" is
          bytes_moved over the copy bandwidth, and the weights are >99.8% of bytes_moved there; the
          target is on the reference-loop case only, since our time is the same against every anchor)
    CPU at T >= 512: >= 0.7x the reference per-expert loop

Checks (each side on a fresh input set, before anything is timed): the side's output is poisoned with
NaN first (ours and the two MoE anchors allocate their outputs: a NaN block of the output's size is
freed just before the call, where torch's caching allocator most likely puts the output; what the check
relies on is that the input set is fresh), then it must be finite everywhere and, on up to CHECK_TOKENS
tokens spread over the batch, within 2^-6 of the output's scale (max |oracle|) of a float32 oracle
(reference.moe_ffn(upcast=True, out_dtype=float32), run over chunks of experts so that the float32 copy
of the weights stays under ORACLE_CHUNK_BYTES); 2^-5 for the reference loop, which rounds every slot's
contribution into a bf16 sum (on the CPU, top-8, H up to 4096: the loop measured up to 0.7 x 2^-6 of the
scale, ours and the grouped_mm path up to 0.3 x 2^-6). The dense GEMM anchor writes preallocated outputs
(poisoned with NaN) that must be finite and within 2^-6 of float32 matmuls of its inputs on a subset of
rows.
"""
import dataclasses
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import moe
from ..reference import moe as reference
from .core import Case, Check, Run, Target, register

MEMORY_BOUND_TOKENS = 64       # T <= this: GB/s of the expert weights read; above, TFLOP/s
ZIPF_EXPONENT = 1.0            # skewed routing: the rank-r expert's prior is proportional to (r + 1)^-1
CHECK_TOKENS = 512             # tokens compared with the float32 oracle (all of them when T is smaller)
DENSE_CHECK_ROWS = 1024        # rows of the dense anchor's outputs compared with float32 matmuls
ORACLE_CHUNK_BYTES = 2 << 30   # float32 weights the oracle converts at once
TOLERANCE = 2 ** -6            # of the output's scale (max |oracle|): ours, torch._grouped_mm, dense
LOOP_TOLERANCE = 2 ** -5       # the reference loop: its k-slot sum is accumulated in bf16 (see the checks)


@dataclasses.dataclass(frozen=True)
class Shape:
    label: str
    experts: int
    hidden: int
    ffn: int
    top_k: int

    def __str__(self) -> str:
        return f"{self.label} E={self.experts} H={self.hidden} F={self.ffn} k={self.top_k}"

    @property
    def expert_bytes(self) -> int:
        """One expert's bf16 weights: gate/up (2F, H) and down (H, F)."""
        return 3 * self.hidden * self.ffn * 2


MIXTRAL = Shape("Mixtral-8x7B", 8, 4096, 14336, 2)
QWEN3 = Shape("Qwen3-30B-A3B", 128, 2048, 768, 8)
DEEPSEEK = Shape("DeepSeek-V3-like", 256, 7168, 2048, 8)
CPU_SHAPE = Shape("Qwen3-like, scaled down", 16, 512, 256, 4)

CUDA_TOKENS = (1, 64, 512, 4096, 16384)
ROUTINGS = ("uniform", "skewed")
QUICK_CUDA = [  # (shape, T, routing)
    (QWEN3, 64, "uniform"), (QWEN3, 4096, "uniform"), (QWEN3, 4096, "skewed"),
    (MIXTRAL, 1, "uniform"), (MIXTRAL, 4096, "uniform")]
CPU_CASES = [(CPU_SHAPE, 512, "uniform"), (CPU_SHAPE, 512, "skewed"), (CPU_SHAPE, 64, "uniform")]
QUICK_CPU = CPU_CASES[:1]


# -- routing: fixed per case, computed once on the CPU ---------------------------------------------

@functools.lru_cache(maxsize=None)
def routing(tokens: int, experts: int, top_k: int, kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 (T, k), expert_ids int32 (T, k)) on the CPU, the same on every call: logits from
    a generator seeded by the arguments; the k largest logits (torch.topk, descending) and the softmax
    over them, which is reference.route's renormalized softmax top-k (the same experts in the same order
    without exactly equal logits, weights within float32 rounding) at about 1/7 of its time (0.1 s for
    T = 16384, E = 256 on a 2-core CPU: the full CUDA list routes every case when it is built)."""
    seed = (tokens * 1_000_003 + experts * 1009 + top_k * 17 + ROUTINGS.index(kind)) % (2 ** 62)
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator)
    if kind == "skewed":
        rank = torch.randperm(experts, generator=generator)            # expert e has rank rank[e]
        logits -= ZIPF_EXPONENT * torch.log1p(rank.to(torch.float32))
    top_logits, expert_ids = torch.topk(logits, top_k, dim=1)
    return torch.softmax(top_logits, dim=1), expert_ids.to(torch.int32)


@functools.lru_cache(maxsize=None)
def experts_used(tokens: int, shape: Shape, kind: str) -> int:
    """Experts with at least one (token, slot) pair in the case's routing."""
    _, expert_ids = routing(tokens, shape.experts, shape.top_k, kind)
    return int((torch.bincount(expert_ids.reshape(-1), minlength=shape.experts) > 0).sum())


# -- inputs ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class MoEInputs:
    x: torch.Tensor                    # (T, H) bf16
    w_gate_up: torch.Tensor            # (E, 2F, H) bf16, stacked [gate; up]
    w_down: torch.Tensor               # (E, H, F) bf16
    weights: torch.Tensor              # (T, k) float32 routing weights
    expert_ids: torch.Tensor           # (T, k) int32
    out: Optional[torch.Tensor] = None           # ours (the op allocates it)
    anchor_out: Optional[torch.Tensor] = None    # the reference loop's or the grouped_mm path's
    # the dense GEMM anchor's operands and preallocated outputs
    x_rep: Optional[torch.Tensor] = None         # (T k, H)
    activation: Optional[torch.Tensor] = None    # (T k, F), the down projection's input
    dense_h: Optional[torch.Tensor] = None       # (T k, 2F)
    dense_y: Optional[torch.Tensor] = None       # (T k, H)


def make_inputs(shape: Shape, tokens: int, kind: str, anchor: str, device: torch.device) -> MoEInputs:
    """A fresh input set: x and the experts' weights drawn in bf16 on the device, the case's routing,
    and the dense anchor's operands when that is the anchor."""
    e, h, f, k = shape.experts, shape.hidden, shape.ffn, shape.top_k
    bf16 = torch.bfloat16
    weights, expert_ids = routing(tokens, e, k, kind)
    inputs = MoEInputs(
        x=torch.randn(tokens, h, device=device, dtype=bf16),
        w_gate_up=torch.randn(e, 2 * f, h, device=device, dtype=bf16).mul_(h ** -0.5),
        w_down=torch.randn(e, h, f, device=device, dtype=bf16).mul_(f ** -0.5),
        weights=weights.to(device), expert_ids=expert_ids.to(device))
    if anchor == "dense":
        inputs.x_rep = inputs.x.repeat_interleave(k, dim=0)
        inputs.activation = torch.randn(tokens * k, f, device=device, dtype=bf16)
        inputs.dense_h = torch.empty(tokens * k, 2 * f, device=device, dtype=bf16)
        inputs.dense_y = torch.empty(tokens * k, h, device=device, dtype=bf16)
    return inputs


# -- the timed functions ---------------------------------------------------------------------------

def _ours(inputs: MoEInputs) -> None:
    inputs.out = moe.moe_ffn(inputs.x, inputs.w_gate_up, inputs.w_down, inputs.weights, inputs.expert_ids)


def _reference_loop(inputs: MoEInputs) -> None:
    inputs.anchor_out = reference.moe_ffn(inputs.x, inputs.w_gate_up, inputs.w_down, inputs.weights,
                                          inputs.expert_ids, upcast=False)


def _grouped_mm_moe(inputs: MoEInputs) -> None:
    """The MoE forward from torch's grouped GEMM, as a user writes it, permutation and combine included."""
    x, expert_ids = inputs.x, inputs.expert_ids
    tokens, top_k = expert_ids.shape
    experts, ffn = inputs.w_down.shape[0], inputs.w_down.shape[2]
    sorted_ids, order = torch.sort(expert_ids.reshape(-1), stable=True)      # pairs p = t k + s, by expert
    group_ends = torch.searchsorted(sorted_ids, torch.arange(experts, device=x.device, dtype=sorted_ids.dtype),
                                    right=True, out_int32=True)               # offs: each expert's end row
    token = order // top_k
    h = torch._grouped_mm(x.index_select(0, token), inputs.w_gate_up.transpose(-2, -1), offs=group_ends)
    a = F.silu(h[:, :ffn]) * h[:, ffn:]
    y = torch._grouped_mm(a, inputs.w_down.transpose(-2, -1), offs=group_ends)   # (T k, H)
    scaled = y.float().mul_(inputs.weights.reshape(-1).index_select(0, order).unsqueeze(1))
    out = torch.zeros(tokens, x.shape[1], device=x.device, dtype=torch.float32).index_add_(0, token, scaled)
    inputs.anchor_out = out.to(x.dtype)


def _dense(inputs: MoEInputs) -> None:
    torch.matmul(inputs.x_rep, inputs.w_gate_up[0].T, out=inputs.dense_h)
    torch.matmul(inputs.activation, inputs.w_down[0].T, out=inputs.dense_y)


# -- checks ----------------------------------------------------------------------------------------

def _poison_next_allocation(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """A NaN block of the output's size, freed at once: torch's caching allocator most likely hands it
    to the next allocation of that size, so an output the call never wrote reads NaN."""
    poison = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del poison


def _spread_rows(count: int, limit: int, device: torch.device) -> torch.Tensor:
    """Up to `limit` row indices spread evenly over [0, count), first and last included."""
    if count <= limit:
        return torch.arange(count, device=device)
    return torch.linspace(0, count - 1, limit, device=device).round().long().unique()


def oracle(inputs: MoEInputs, tokens: torch.Tensor) -> torch.Tensor:
    """float32 (len(tokens), H): reference.moe_ffn(upcast=True) on the given tokens, summed over chunks
    of experts (the float32 copy of a chunk's weights under ORACLE_CHUNK_BYTES): each chunk sees the
    pairs of other experts with weight 0 on its first expert, which adds exact zeros."""
    x, weights, expert_ids = inputs.x[tokens], inputs.weights[tokens], inputs.expert_ids[tokens]
    experts, hidden, ffn = inputs.w_down.shape
    chunk = max(1, ORACLE_CHUNK_BYTES // (3 * hidden * ffn * 4))
    out = torch.zeros(x.shape[0], hidden, device=x.device, dtype=torch.float32)
    for first in range(0, experts, chunk):
        last = min(experts, first + chunk)
        inside = (expert_ids >= first) & (expert_ids < last)
        if not bool(inside.any()):
            continue
        out += reference.moe_ffn(x, inputs.w_gate_up[first:last], inputs.w_down[first:last],
                                 torch.where(inside, weights, torch.zeros((), device=x.device)),
                                 torch.where(inside, expert_ids - first, torch.zeros_like(expert_ids)),
                                 upcast=True, out_dtype=torch.float32)
    return out


def _check_moe(attribute: str, tolerance: float, inputs: MoEInputs, run) -> None:
    """The call wrote its (T, H) output (poisoned first): finite, and within `tolerance` of the output's
    scale of the float32 oracle on up to CHECK_TOKENS tokens."""
    shape = tuple(inputs.x.shape)
    _poison_next_allocation(shape, inputs.x.dtype, inputs.x.device)
    run(inputs)
    out = getattr(inputs, attribute)
    assert out is not None and tuple(out.shape) == shape and out.dtype == inputs.x.dtype, \
        f"{attribute} not written as {inputs.x.dtype} {shape}"
    assert torch.isfinite(out).all(), f"{attribute} has non-finite values (not written?)"
    tokens = _spread_rows(shape[0], CHECK_TOKENS, out.device)
    expected = oracle(inputs, tokens)
    scale = expected.abs().max().item()
    error = (out[tokens].float() - expected).abs().max().item()
    assert error <= tolerance * scale, \
        f"{attribute} is off the float32 oracle by {error:.3g} (output scale {scale:.3g})"


def _check_dense(inputs: MoEInputs, run) -> None:
    """Both matmuls wrote their outputs (poisoned first): finite, and within TOLERANCE of the output's
    scale of float32 matmuls of the same operands on up to DENSE_CHECK_ROWS rows."""
    inputs.dense_h.fill_(float("nan"))
    inputs.dense_y.fill_(float("nan"))
    run(inputs)
    rows = _spread_rows(inputs.x_rep.shape[0], DENSE_CHECK_ROWS, inputs.x.device)
    for name, out, a, w in (("gate/up", inputs.dense_h, inputs.x_rep, inputs.w_gate_up[0]),
                            ("down", inputs.dense_y, inputs.activation, inputs.w_down[0])):
        assert torch.isfinite(out).all(), f"dense {name} output has non-finite values (not written?)"
        expected = a[rows].float() @ w.float().T
        scale = expected.abs().max().item()
        error = (out[rows].float() - expected).abs().max().item()
        assert error <= TOLERANCE * scale, \
            f"dense {name} output is off a float32 matmul by {error:.3g} (output scale {scale:.3g})"


@dataclasses.dataclass(frozen=True)
class Anchor:
    name: str
    run: Run
    check: Check


ANCHORS = {
    "reference": Anchor("reference loop", _reference_loop, functools.partial(_check_moe, "anchor_out", LOOP_TOLERANCE)),
    "grouped_mm": Anchor("torch._grouped_mm", _grouped_mm_moe, functools.partial(_check_moe, "anchor_out", TOLERANCE)),
    "dense": Anchor("dense bf16 GEMM", _dense, _check_dense),
}


# -- cases -----------------------------------------------------------------------------------------

def _targets(device: torch.device, anchor: str, tokens: int) -> List[Target]:
    if device.type != "cuda":
        if anchor == "reference" and tokens >= 512:
            return [Target("ratio", 0.7,
                           "CPU: the C++ MoE forward at least 0.7x the reference per-expert loop, T >= 512")]
        return []
    if anchor == "dense" and tokens >= 4096:
        return [Target("ratio", 0.85, "forward >= 0.85x the dense bf16 GEMM of the same FLOPs at T >= 4096")]
    if anchor == "grouped_mm":
        return [Target("ratio", 1.0, "forward >= 1.0x the torch._grouped_mm path at every T")]
    if anchor == "reference" and tokens <= MEMORY_BOUND_TOKENS:
        # core's fraction is bytes_moved / copy bandwidth; the weights read are > 99.8% of bytes_moved here
        return [Target("fraction", 0.70, "decode (T <= 64) >= 70% of copy bandwidth on the expert weights read")]
    return []


def _case(shape: Shape, tokens: int, kind: str, anchor: str, device: torch.device) -> Case:
    k = shape.top_k
    bytes_moved = (experts_used(tokens, shape, kind) * shape.expert_bytes
                   + 2 * 2 * tokens * shape.hidden     # x read, out written (bf16)
                   + 8 * tokens * k)                  # routing weights (float32) and expert ids (int32)
    spec = ANCHORS[anchor]
    return Case(name="moe.moe_ffn", description=f"{shape} T={tokens} {kind}", dtype=torch.bfloat16, device=device,
                setup=functools.partial(make_inputs, shape, tokens, kind, anchor, device),
                run=_ours, check=functools.partial(_check_moe, "out", TOLERANCE),
                anchor_name=spec.name, anchor_run=spec.run, anchor_check=spec.check,
                bytes_moved=bytes_moved,
                flops=None if tokens <= MEMORY_BOUND_TOKENS else 2 * tokens * k * 3 * shape.hidden * shape.ffn,
                targets=tuple(_targets(device, anchor, tokens)))


def _cases(configs: Sequence[Tuple[Shape, int, str]], anchors: Sequence[str], device: torch.device) -> List[Case]:
    return [_case(shape, tokens, kind, anchor, device) for shape, tokens, kind in configs for anchor in anchors]


@register("moe")
def cases(device: torch.device, quick: bool) -> List[Case]:
    if device.type == "cuda":
        anchors = ["reference"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else []) + ["dense"]
        configs = QUICK_CUDA if quick else [(shape, tokens, kind) for shape in (MIXTRAL, QWEN3, DEEPSEEK)
                                            for tokens in CUDA_TOKENS for kind in ROUTINGS]
        return _cases(configs, anchors, device)
    if device.type != "cpu":
        return []
    return _cases(QUICK_CPU if quick else CPU_CASES, ["reference"], device)
