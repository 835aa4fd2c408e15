"""Mixture-of-Experts benchmark cases (issue 12): the routed experts' FFN, bf16, forward and one training
step (forward + backward), against what a user would run without us.

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

    moe.moe_ffn.fwd_bwd   one training step of the experts: the forward with x, w_gate_up, w_down and the
                          routing weights requiring grad, then torch.autograd.grad of the output for a
                          given dout (bf16 (T, H)): dx, dw_gate_up, dw_down, dweights (nothing accumulates
                          into .grad; each side is timed the same way, _train_step)
        vs  reference loop     the same loop through autograd (bf16 throughout)
        vs  torch._grouped_mm  the same sorted-by-expert path through autograd (torch 2.13's derivatives.yaml
                               gives _grouped_mm a backward for both matrices, _grouped_mm_mat1_backward and
                               _grouped_mm_mat2_backward, themselves grouped GEMMs; tried on the CPU: its
                               gradients match a float32 per-group loop within bf16 rounding, and it refuses
                               an incoming gradient with zero strides, as y.sum().backward() gives, which
                               the step never passes it)
        vs  dense bf16 GEMM    the forward's two matmuls and the backward's four, dX and dW of each, with
                               random output gradients: (T k, 2F) @ (2F, H), (2F, T k) @ (T k, H),
                               (T k, H) @ (H, F), (H, T k) @ (T k, F); 3x the forward's FLOPs

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
(128, 2048, 768, 8), DeepSeek-V3-like (256, 7168, 2048, 8).
    forward: T in 1, 64, 512, 4096, 16384, uniform and skewed routing, each against all three anchors:
        90 cases (60 without torch._grouped_mm).
    forward+backward: Qwen3 at T = 4096 and 16384, uniform and skewed, Mixtral at T = 4096 uniform, each
        against all three anchors: 15 cases (10 without torch._grouped_mm).
    Together 105 cases (70), roughly 12-18 min on an H100 (an estimate, not measured).
    --quick: forward Qwen3 at T = 64 and 4096 (4096 also skewed), Mixtral at T = 1 and 4096, against all
        three anchors (15 cases, 10 without torch._grouped_mm); forward+backward Qwen3 at T = 4096
        uniform against the reference loop and the dense GEMM (2 cases): 17 cases (12), an estimated
        35-50 s on an H100 with setup and checks, the two forward+backward cases about 5-10 s of it (an
        estimate, not measured: the reference loop's step launches some 30 kernels per expert and syncs
        the host in each expert's nonzero()).
CPU: a scaled-down Qwen3 (E=16, H=512, F=256, top-4), against the reference loop only: the forward at
T = 512 (uniform and skewed) and 64 (--quick: T = 512 uniform), the forward+backward at T = 512 uniform
(--quick too).

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

Throughput: T >= 512 in TFLOP/s of the routed work, 2 T k (2F H + H F) for swiglu (forward+backward: 3x
that, the backward's dX and dW of both matmuls), against the bf16 matmul peak. T <= 64 in effective
GB/s (flops=None): bytes_moved counts the weights of the experts that get at least one token (counted on
the case's routing when the list is built), plus x read and out written (bf16) and the routing (weights,
ids); on the CUDA shapes the weights are over 99.8% of it at T <= 64. Our intermediates (the gathered and
activated rows) are not counted. The dense anchor reads one expert's weights, so at T <= 64 it is no
yardstick (no target there); it is one at T >= 4096. (forward+backward's bytes_moved, which only sizes
the input-set rotation there: the weights read twice and their gradients written, x, out, dout, dx.)

Targets (printed under the table, not asserted):
    forward at T >= 4096: >= 0.85x the dense bf16 GEMM of the same FLOPs
    forward at every T: >= 1.0x the torch._grouped_mm path
    decode (T <= 64): >= 70% of the copy bandwidth on the expert weights read (core's "fraction" is
          bytes_moved over the copy bandwidth, and the weights are >99.8% of bytes_moved there; the
          target is on the reference-loop case only, since our time is the same against every anchor)
    CPU at T >= 512: >= 0.7x the reference per-expert loop
    CPU forward+backward (T = 512): >= 1.0x the reference loop through autograd (measured on a 2-core
          AVX2 EPYC: 7.8x with the cores quiet, 213 vs 1655 ms a step; 5.8x with one thread; 0.85-2.9x
          while another job held both cores, our OpenMP regions stalling more than the loop's ops)
    forward+backward on the Qwen3 shape: >= 400 TFLOP/s (core's "tflops" metric, an absolute rate; on the
          dense-anchor case only, since our time is the same against every anchor)

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
rows (forward+backward: its six matmuls).
Forward+backward, per side: blocks of the output's and the four gradients' sizes are poisoned likewise;
the output and every gradient must be finite everywhere, and each within the side's tolerance (the
forward's: 2^-6, 2^-5 for the reference loop) of its own scale of a float32 oracle, reference.moe_ffn(
upcast=True) through autograd in float32 with the memory bounded: the output, dx and dweights on the
CHECK_TOKENS tokens (oracle(..., dout): the gradients summed over the expert chunks, as the output is),
dw_gate_up and dw_down of three experts, the first and the last with tokens and the most loaded, each
from that expert's (token, slot) pairs alone (weight_grad_oracle). Measured on the CPU, in units of
2^-6 of each gradient's scale, largest over out/dx/dweights/dw_gate_up/dw_down and over runs (fresh
random inputs each), E=16 H=512 F=256 k=4 T=512 (uniform and skewed) and E=8 H=2048 F=768 k=8 T=256:
ours 0.44, the reference loop 0.86, the grouped_mm path 0.61, the dense GEMM's six matmuls 0.23.
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
TRAIN_TFLOPS = 400             # forward+backward target on the Qwen3 shape (H100, bf16)


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
# forward+backward (one training step of the experts)
TRAIN_CUDA = [(QWEN3, 4096, "uniform"), (QWEN3, 4096, "skewed"), (QWEN3, 16384, "uniform"), (QWEN3, 16384, "skewed"),
              (MIXTRAL, 4096, "uniform")]
QUICK_TRAIN_CUDA = TRAIN_CUDA[:1]
TRAIN_CPU = [(CPU_SHAPE, 512, "uniform")]      # --quick too


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
    # forward+backward: x, both weights and the routing weights require grad; dout is the loss's gradient
    dout: Optional[torch.Tensor] = None          # (T, H) bf16
    grads: Optional[Tuple[torch.Tensor, ...]] = None   # (dx, dw_gate_up, dw_down, dweights) of the last step
    # the dense GEMM anchor's matmuls: (name, a, b, out) with out = a @ b, outputs preallocated
    dense: Sequence[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = ()

    def leaves(self) -> Tuple[torch.Tensor, ...]:
        """What a training step differentiates with respect to, in the order of `grads`."""
        return self.x, self.w_gate_up, self.w_down, self.weights


def _dense_operands(inputs: MoEInputs, shape: Shape, backward: bool) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, a, b) of the dense anchor's matmuls, the routed work's shapes on one expert's weights: the
    forward's (T k, H) @ (2F, H)ᵀ and (T k, F) @ (H, F)ᵀ; with `backward`, each one's dX and dW too
    (random output gradients dh (T k, 2F) and dy (T k, H)): three times the forward's FLOPs."""
    rows, bf16, device = inputs.x.shape[0] * shape.top_k, torch.bfloat16, inputs.x.device
    w_gate_up, w_down = inputs.w_gate_up[0].detach(), inputs.w_down[0].detach()
    x_rep = inputs.x.detach().repeat_interleave(shape.top_k, dim=0)
    activation = torch.randn(rows, shape.ffn, device=device, dtype=bf16)   # the down projection's input
    operands = [("gate/up", x_rep, w_gate_up.T), ("down", activation, w_down.T)]
    if backward:
        dh = torch.randn(rows, 2 * shape.ffn, device=device, dtype=bf16)
        dy = torch.randn(rows, shape.hidden, device=device, dtype=bf16)
        operands += [("d activation", dy, w_down), ("d w_down", dy.T, activation),
                     ("d x", dh, w_gate_up), ("d w_gate_up", dh.T, x_rep)]
    return operands


def make_inputs(shape: Shape, tokens: int, kind: str, anchor: str, backward: bool, device: torch.device) -> MoEInputs:
    """A fresh input set: x and the experts' weights drawn in bf16 on the device, the case's routing,
    with `backward` the leaves requiring grad and dout, and the dense anchor's operands when that is
    the anchor."""
    e, h, f, k = shape.experts, shape.hidden, shape.ffn, shape.top_k
    bf16 = torch.bfloat16
    weights, expert_ids = routing(tokens, e, k, kind)
    inputs = MoEInputs(
        x=torch.randn(tokens, h, device=device, dtype=bf16),
        w_gate_up=torch.randn(e, 2 * f, h, device=device, dtype=bf16).mul_(h ** -0.5),
        w_down=torch.randn(e, h, f, device=device, dtype=bf16).mul_(f ** -0.5),
        weights=weights.to(device, copy=True), expert_ids=expert_ids.to(device))   # copy: routing() is cached
    if backward:
        for leaf in inputs.leaves():
            leaf.requires_grad_()
        inputs.dout = torch.randn(tokens, h, device=device, dtype=bf16)
    if anchor == "dense":
        inputs.dense = [(name, a, b, torch.empty(a.shape[0], b.shape[1], device=device, dtype=bf16))
                        for name, a, b in _dense_operands(inputs, shape, backward)]
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
    for _, a, b, out in inputs.dense:
        torch.matmul(a, b, out=out)


def _train_step(forward: Run, attribute: str, inputs: MoEInputs) -> None:
    """One training step of the experts: `forward` (which writes inputs.<attribute>) through autograd,
    then the gradients of the leaves for dout. torch.autograd.grad on both sides: nothing accumulates
    into .grad, and the graph is freed with the step."""
    inputs.grads = None                      # the last step's gradients are not held through this one
    forward(inputs)
    inputs.grads = torch.autograd.grad(getattr(inputs, attribute), inputs.leaves(), inputs.dout)


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


def oracle(inputs: MoEInputs, tokens: torch.Tensor, dout: Optional[torch.Tensor] = None):
    """float32 (len(tokens), H): reference.moe_ffn(upcast=True) on the given tokens, summed over chunks
    of experts (the float32 copy of a chunk's weights under ORACLE_CHUNK_BYTES): each chunk sees the
    pairs of other experts with weight 0 on its first expert, which adds exact zeros. With dout
    (len(tokens), H), also the gradients of <out, dout> with respect to those tokens' x and routing
    weights: (out, dx, dweights), float32, each chunk's added before the next chunk is converted (the
    output is linear in the experts' contributions, so are its gradients)."""
    with_grad = dout is not None
    x = inputs.x[tokens].detach().float().requires_grad_(with_grad)
    weights = inputs.weights[tokens].detach().float().requires_grad_(with_grad)
    expert_ids = inputs.expert_ids[tokens]
    experts, hidden, ffn = inputs.w_down.shape
    chunk = max(1, ORACLE_CHUNK_BYTES // (3 * hidden * ffn * 4))
    out = torch.zeros(x.shape[0], hidden, device=x.device, dtype=torch.float32)
    grads = [torch.zeros_like(x), torch.zeros_like(weights)]
    for first in range(0, experts, chunk):
        last = min(experts, first + chunk)
        inside = (expert_ids >= first) & (expert_ids < last)
        if not bool(inside.any()):
            continue
        with torch.set_grad_enabled(with_grad):
            part = reference.moe_ffn(x, inputs.w_gate_up[first:last].detach().float(),
                                     inputs.w_down[first:last].detach().float(),
                                     torch.where(inside, weights, torch.zeros((), device=x.device)),
                                     torch.where(inside, expert_ids - first, torch.zeros_like(expert_ids)),
                                     upcast=True, out_dtype=torch.float32)
        out += part.detach()
        if with_grad:
            for total, grad in zip(grads, torch.autograd.grad(part, (x, weights), dout.float())):
                total += grad
    return (out, *grads) if with_grad else out


def weight_grad_oracle(inputs: MoEInputs, expert: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 (dw_gate_up[expert], dw_down[expert]) for inputs.dout: reference.moe_ffn(upcast=True) of
    that expert alone over its (token, slot) pairs, the only ones that touch its weights."""
    token, slot = (inputs.expert_ids == expert).nonzero().unbind(1)
    w_gate_up, w_down = (w[expert:expert + 1].detach().float().requires_grad_()
                         for w in (inputs.w_gate_up, inputs.w_down))
    out = reference.moe_ffn(inputs.x[token].detach().float(), w_gate_up, w_down,
                            inputs.weights[token, slot].detach().float()[:, None],
                            torch.zeros(token.shape[0], 1, dtype=torch.int32, device=token.device),
                            upcast=True, out_dtype=torch.float32)
    return tuple(g[0] for g in torch.autograd.grad(out, (w_gate_up, w_down), inputs.dout[token].float()))


def checked_experts(expert_ids: torch.Tensor, experts: int) -> List[int]:
    """The experts whose weight gradients are checked: the first and the last that have a (token, slot)
    pair, and the most loaded."""
    counts = torch.bincount(expert_ids.reshape(-1).long(), minlength=experts)
    used = counts.nonzero().reshape(-1).tolist()
    return sorted({used[0], used[-1], int(counts.argmax())})


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> Tuple[float, float]:
    """(max |got - expected|, the scale max |expected|)."""
    return (got.float() - expected).abs().max().item(), expected.abs().max().item()


def _assert_close(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    error, scale = _relative_error(got, expected)
    assert error <= tolerance * scale, f"{name} is off {what} by {error:.3g} (scale {scale:.3g})"


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
    _assert_close(attribute, out[tokens], oracle(inputs, tokens), tolerance, "the float32 oracle")


GRAD_NAMES = ("dx", "dw_gate_up", "dw_down", "dweights")


def train_step_errors(attribute: str, inputs: MoEInputs) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, got, float32 oracle) of the step just run: the output, dx and dweights on up to
    CHECK_TOKENS tokens, dw_gate_up and dw_down of checked_experts()."""
    dx, dw_gate_up, dw_down, dweights = inputs.grads
    tokens = _spread_rows(inputs.x.shape[0], CHECK_TOKENS, dx.device)
    out, dx_oracle, dweights_oracle = oracle(inputs, tokens, inputs.dout[tokens])
    compared = [(attribute, getattr(inputs, attribute).detach()[tokens], out), ("dx", dx[tokens], dx_oracle),
                ("dweights", dweights[tokens], dweights_oracle)]
    for expert in checked_experts(inputs.expert_ids, inputs.w_down.shape[0]):
        expected = weight_grad_oracle(inputs, expert)
        compared += [(f"dw_gate_up[{expert}]", dw_gate_up[expert], expected[0]),
                     (f"dw_down[{expert}]", dw_down[expert], expected[1])]
    return compared


def _check_train_step(attribute: str, tolerance: float, inputs: MoEInputs, run) -> None:
    """The training step wrote the output and the four gradients (their sizes poisoned first, as for the
    forward): all finite, and each within `tolerance` of its scale (max |oracle|) of the float32
    oracle on the entries train_step_errors() compares."""
    for leaf in inputs.leaves() + (inputs.x,):    # the gradients' sizes and the output's
        _poison_next_allocation(tuple(leaf.shape), leaf.dtype, leaf.device)
    run(inputs)
    assert inputs.grads is not None, "no gradients written"
    for name, written in zip((attribute,) + GRAD_NAMES, (getattr(inputs, attribute),) + tuple(inputs.grads)):
        assert torch.isfinite(written).all(), f"{name} has non-finite values (not written?)"
    for name, got, expected in train_step_errors(attribute, inputs):
        _assert_close(name, got, expected, tolerance, "the float32 oracle")


def _check_dense(inputs: MoEInputs, run) -> None:
    """Every matmul wrote its output (poisoned first): finite, and within TOLERANCE of the output's scale
    of a float32 matmul of the same operands on up to DENSE_CHECK_ROWS rows."""
    for _, _, _, out in inputs.dense:
        out.fill_(float("nan"))
    run(inputs)
    for name, a, b, out in inputs.dense:
        assert torch.isfinite(out).all(), f"dense {name} output has non-finite values (not written?)"
        rows = _spread_rows(out.shape[0], DENSE_CHECK_ROWS, out.device)
        _assert_close(f"dense {name} output", out[rows], a[rows].float() @ b.float(), TOLERANCE,
                      "a float32 matmul")


def _moe_side(forward: Run, attribute: str, tolerance: float, backward: bool) -> Tuple[Run, Check]:
    """The timed function and its check for a side that runs an MoE forward writing inputs.<attribute>
    (ours, the reference loop, the grouped_mm path): the forward alone, or the training step."""
    if backward:
        return (functools.partial(_train_step, forward, attribute),
                functools.partial(_check_train_step, attribute, tolerance))
    return forward, functools.partial(_check_moe, attribute, tolerance)


@dataclasses.dataclass(frozen=True)
class Anchor:
    name: str
    forward: Run                     # writes inputs.anchor_out; the dense anchor: its matmuls
    tolerance: Optional[float]       # of the oracle check; None for the dense anchor (its own check)

    def side(self, backward: bool) -> Tuple[Run, Check]:
        if self.tolerance is None:   # the dense anchor: its operands already hold the backward's matmuls
            return self.forward, _check_dense
        return _moe_side(self.forward, "anchor_out", self.tolerance, backward)


ANCHORS = {
    "reference": Anchor("reference loop", _reference_loop, LOOP_TOLERANCE),
    "grouped_mm": Anchor("torch._grouped_mm", _grouped_mm_moe, TOLERANCE),
    "dense": Anchor("dense bf16 GEMM", _dense, None),
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


def _train_targets(device: torch.device, shape: Shape, anchor: str) -> List[Target]:
    if device.type != "cuda":
        return [Target("ratio", 1.0, "CPU: the C++ MoE forward+backward at least 1.0x the reference per-expert loop")]
    # An absolute rate: our time is the same against every anchor, so the target sits on the dense case only.
    if shape == QWEN3 and anchor == "dense":
        return [Target("tflops", TRAIN_TFLOPS, f"forward+backward on the Qwen3 shape >= {TRAIN_TFLOPS} TFLOP/s")]
    return []


def _case(shape: Shape, tokens: int, kind: str, anchor: str, backward: bool, device: torch.device) -> Case:
    k = shape.top_k
    # the forward: the used experts' weights read, x read and out written (bf16), the routing (float32
    # weights, int32 ids); the training step: the weights read twice and their gradients written, x read
    # twice, out, dout and dx, the routing and dweights (float32)
    passes, activations, routing_bytes = (3, 5, 12) if backward else (1, 2, 8)
    bytes_moved = (passes * experts_used(tokens, shape, kind) * shape.expert_bytes
                   + activations * 2 * tokens * shape.hidden + routing_bytes * tokens * k)
    forward_flops = 2 * tokens * k * 3 * shape.hidden * shape.ffn
    run, check = _moe_side(_ours, "out", TOLERANCE, backward)
    anchor_run, anchor_check = ANCHORS[anchor].side(backward)
    return Case(name="moe.moe_ffn.fwd_bwd" if backward else "moe.moe_ffn", description=f"{shape} T={tokens} {kind}",
                dtype=torch.bfloat16, device=device,
                setup=functools.partial(make_inputs, shape, tokens, kind, anchor, backward, device),
                run=run, check=check, anchor_name=ANCHORS[anchor].name, anchor_run=anchor_run,
                anchor_check=anchor_check, bytes_moved=bytes_moved,
                flops=(3 * forward_flops if backward else None if tokens <= MEMORY_BOUND_TOKENS else forward_flops),
                targets=tuple(_train_targets(device, shape, anchor) if backward else _targets(device, anchor, tokens)))


def _cases(configs: Sequence[Tuple[Shape, int, str]], anchors: Sequence[str], device: torch.device, *,
           backward: bool = False) -> List[Case]:
    return [_case(shape, tokens, kind, anchor, backward, device)
            for shape, tokens, kind in configs for anchor in anchors]


@register("moe")
def cases(device: torch.device, quick: bool) -> List[Case]:
    if device.type == "cuda":
        anchors = ["reference"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else []) + ["dense"]
        if quick:
            return (_cases(QUICK_CUDA, anchors, device)
                    + _cases(QUICK_TRAIN_CUDA, ["reference", "dense"], device, backward=True))
        configs = [(shape, tokens, kind) for shape in (MIXTRAL, QWEN3, DEEPSEEK)
                   for tokens in CUDA_TOKENS for kind in ROUTINGS]
        return _cases(configs, anchors, device) + _cases(TRAIN_CUDA, anchors, device, backward=True)
    if device.type != "cpu":
        return []
    return (_cases(QUICK_CPU if quick else CPU_CASES, ["reference"], device)
            + _cases(TRAIN_CPU, ["reference"], device, backward=True))
