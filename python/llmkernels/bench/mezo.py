"""MeZO benchmark cases: the fused sweeps over a parameter list laid out like a 1B-parameter Llama.

    mezo.perturb    perturb_                 vs  a device copy of the same bytes
    mezo.update     update_ (restore + SGD)  vs  the reference loop, and vs the paper's published loop
    mezo.step_fold  update_ with next_seed   vs  the reference loop with next_seed

TinyLlama-1.1B's 201 tensors on CUDA; on CPU the same 201-tensor structure scaled down so the
default run stays under a minute on two cores (33 s measured).

Checks (run on a fresh input set before anything is timed): every sweep, ours or a loop, must
change every parameter tensor and leave it finite (a multi-tensor sweep that skips one tensor is a
real bug); the copy anchor must copy.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional, Tuple

import torch

from ..mezo import perturb_, update_
from ..reference import mezo as reference
from .core import Case, Target, register

LR, EPS, WEIGHT_DECAY, PROJECTED_GRAD = 1e-6, 1e-3, 0.01, 0.5
INIT_STD = 0.02   # the usual Llama init scale; small lr and eps keep repeated sweeps bounded


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // 8   # 32 query heads and 4 KV heads, as TinyLlama

    def tensor_shapes(self) -> List[Tuple[int, ...]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        layer = [(h, h), (kv, h), (kv, h), (h, h),   # q, k, v, o
                 (i, h), (i, h), (h, i),             # gate, up, down
                 (h,), (h,)]                         # input and post-attention RMSNorm
        return [(self.vocab, h)] + layer * self.layers + [(h,), (self.vocab, h)]

    def numel(self) -> int:
        return sum(torch.Size(shape).numel() for shape in self.tensor_shapes())

    def describe(self) -> str:
        numel = self.numel()
        count = f"{numel / 1e9:.2f}B" if numel >= 1e9 else f"{numel / 1e6:.1f}M"
        return f"{len(self.tensor_shapes())} tensors, {count} params (Llama h{self.hidden})"


TINYLLAMA = LlamaShape(hidden=2048, intermediate=5632, vocab=32000, layers=22)   # 1.10B params
SHAPES = {  # (device type, quick) -> shape
    ("cuda", False): TINYLLAMA,
    ("cuda", True): LlamaShape(hidden=1024, intermediate=2816, vocab=32000, layers=8),   # 154M
    ("cpu", False): LlamaShape(hidden=256, intermediate=704, vocab=4000, layers=22),     # 17.2M
    ("cpu", True): LlamaShape(hidden=128, intermediate=352, vocab=2000, layers=22),      # 4.3M
}


@dataclasses.dataclass
class SweepInputs:
    params: List[torch.Tensor]
    projected_grad: torch.Tensor    # 0-dim, on the device, as MeZO.step passes it (no host sync)
    copy_src: Optional[torch.Tensor] = None
    copy_dst: Optional[torch.Tensor] = None
    seed: int = 0

    def next_seed(self) -> int:
        # A fresh direction every call, as in training: repeated +eps z with one seed would drift.
        self.seed += 1
        return self.seed


def make_inputs(shape: LlamaShape, dtype: torch.dtype, device: torch.device, *,
                with_copy_buffers: bool = False) -> SweepInputs:
    params = [(torch.randn(s, device=device) * INIT_STD).to(dtype) for s in shape.tensor_shapes()]
    inputs = SweepInputs(params, torch.tensor(PROJECTED_GRAD, device=device))
    if with_copy_buffers:   # flat tensors with the parameters' byte count, for the copy anchor
        inputs.copy_src = torch.randn(shape.numel(), device=device).to(dtype)
        inputs.copy_dst = torch.empty_like(inputs.copy_src)
    return inputs


def published_update_(params, seed: int, lr: float, projected_grad: float, eps: float,
                      weight_decay: float) -> None:
    """The restore and update sweeps of the MeZO paper's published trainer: the global generator
    reseeded before each sweep, z drawn per tensor with torch.normal in the parameter dtype, new
    tensors assigned to .data. projected_grad is a Python float there (they call .item())."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data = p.data + eps * z
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data = p.data - lr * (projected_grad * z + weight_decay * p.data)


def _perturb(inputs: SweepInputs) -> None:
    perturb_(inputs.params, inputs.next_seed(), EPS)


def _device_copy(inputs: SweepInputs) -> None:
    inputs.copy_dst.copy_(inputs.copy_src)


def _update(inputs: SweepInputs) -> None:
    update_(inputs.params, inputs.next_seed(), LR, inputs.projected_grad, EPS, WEIGHT_DECAY)


def _reference_update(inputs: SweepInputs) -> None:
    reference.update_(inputs.params, inputs.next_seed(), LR, inputs.projected_grad, EPS, WEIGHT_DECAY)


def _published_update(inputs: SweepInputs) -> None:
    published_update_(inputs.params, inputs.next_seed(), LR, PROJECTED_GRAD, EPS, WEIGHT_DECAY)


def _update_folded(inputs: SweepInputs) -> None:
    seed = inputs.next_seed()
    update_(inputs.params, seed, LR, inputs.projected_grad, EPS, WEIGHT_DECAY, next_seed=seed + 1)


def _reference_update_folded(inputs: SweepInputs) -> None:
    seed = inputs.next_seed()
    reference.update_(inputs.params, seed, LR, inputs.projected_grad, EPS, WEIGHT_DECAY, next_seed=seed + 1)


def check_sweep(inputs: SweepInputs, run) -> None:
    """The sweep wrote every tensor of the list and left nothing NaN or infinite."""
    before = [p.clone() for p in inputs.params]
    run(inputs)
    for index, (param, old) in enumerate(zip(inputs.params, before)):
        assert torch.isfinite(param).all(), f"params[{index}] ({tuple(param.shape)}) has non-finite values"
        assert not torch.equal(param, old), f"params[{index}] ({tuple(param.shape)}) was not updated"


def check_copy(inputs: SweepInputs, run) -> None:
    """The copy anchor copied: the destination is poisoned first, so a copy that did nothing fails."""
    inputs.copy_dst.fill_(float("nan"))
    run(inputs)
    assert torch.equal(inputs.copy_dst, inputs.copy_src), "copy_dst does not hold copy_src"


def _case(shape: LlamaShape, dtype: torch.dtype, device: torch.device, name: str, anchor_name: str,
          run, anchor_run, targets=(), anchor_check=check_sweep, with_copy_buffers: bool = False) -> Case:
    return Case(name=name, description=shape.describe(), dtype=dtype, device=device,
                setup=functools.partial(make_inputs, shape, dtype, device, with_copy_buffers=with_copy_buffers),
                run=run, check=check_sweep, anchor_name=anchor_name, anchor_run=anchor_run,
                anchor_check=anchor_check,
                bytes_moved=2 * shape.numel() * dtype.itemsize,   # one read and one write of every parameter
                targets=tuple(targets))


@register("mezo")
def cases(device: torch.device, quick: bool) -> List[Case]:
    shape = SHAPES[(device.type, quick)]
    on_cuda = device.type == "cuda"
    result = []
    for dtype, copy_fraction in ((torch.float32, 0.85), (torch.bfloat16, 0.70)):
        sweep = [Target("fraction", copy_fraction, f"CUDA sweep >= {copy_fraction:.0%} of copy bandwidth")]
        if on_cuda:
            vs_reference = sweep + [Target("ratio", 5.0, "CUDA >= 5x faster than the reference loop")]
            vs_published = []
        else:
            sweep, vs_reference = [], []
            vs_published = [Target("ratio", 3.0, "CPU >= 3x faster than the published loop")]
        result += [
            _case(shape, dtype, device, "mezo.perturb", "device copy", _perturb, _device_copy, sweep,
                  anchor_check=check_copy, with_copy_buffers=True),
            _case(shape, dtype, device, "mezo.update", "reference loop", _update, _reference_update, vs_reference),
            _case(shape, dtype, device, "mezo.update", "published loop", _update, _published_update, vs_published),
            _case(shape, dtype, device, "mezo.step_fold", "reference loop", _update_folded, _reference_update_folded),
        ]
    return result
