"""Benchmark machinery: cases, the registry of case families, timers and the device's limits.

A family module registers one function that builds its cases for a device:

    @register("mezo")
    def cases(device: torch.device, quick: bool) -> list[Case]: ...

Every case times our kernel and a named anchor (what a user would run without us) in the same
process, on the same device, on the same inputs. The runner (runner.py) reports both, their ratio,
and the fraction of a physical limit measured in the same run (copy bandwidth or matmul peak).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

MIN_REPEATS, MAX_REPEATS = 5, 200
WARMUP_SECONDS = 0.1       # first calls pay for allocation, lazy initialization, GPU clock ramp-up
MAX_INPUT_SETS = 32        # rotation cap: memory and setup time grow with every extra set
DEFAULT_L2_BYTES = 50 * 2**20      # H100 L2, if torch does not report it
DEFAULT_CPU_CACHE_BYTES = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal printed under the family's table, never asserted: `metric` >= `minimum`, where metric
    is "ratio" (anchor time / our time) or "fraction" (of the physical limit)."""
    metric: str
    minimum: float
    text: str

    def met_by(self, record: Dict[str, Any]) -> Optional[bool]:
        value = record.get(self.metric)
        return None if value is None else value >= self.minimum


@dataclasses.dataclass(frozen=True)
class Case:
    name: str                       # "mezo.update": what --filter matches
    description: str                # shapes or parameter count, for the table
    dtype: torch.dtype
    device: torch.device
    setup: Callable[[], Any]        # fresh random inputs (never zeros); called once per input set
    run: Callable[[Any], None]      # our kernel on one input set
    anchor_name: str
    anchor_run: Callable[[Any], None]
    bytes_moved: int                # bytes our kernel reads + writes per call
    flops: Optional[int] = None     # set for compute-bound cases: TFLOP/s against the matmul peak
    targets: Sequence[Target] = ()
    family: str = ""                # set by the registry


CaseBuilder = Callable[[torch.device, bool], List[Case]]
_FAMILIES: Dict[str, CaseBuilder] = {}


def register(family: str) -> Callable[[CaseBuilder], CaseBuilder]:
    """Decorator for a family's `cases(device, quick)` function."""
    def decorate(builder: CaseBuilder) -> CaseBuilder:
        if family in _FAMILIES:
            raise ValueError(f"benchmark family {family!r} is registered twice")
        _FAMILIES[family] = builder
        return builder
    return decorate


def build_cases(device: torch.device, quick: bool) -> List[Case]:
    """Every registered family's cases for `device`; building them allocates nothing."""
    return [dataclasses.replace(case, family=family)
            for family, builder in _FAMILIES.items()
            for case in builder(device, quick)]


# -- timing -------------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_calls_cpu(run, input_sets, count: int) -> List[float]:
    samples = []
    for call in range(count):
        inputs = input_sets[call % len(input_sets)]
        start = time.perf_counter()
        run(inputs)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _timed_calls_cuda(run, input_sets, count: int, device: torch.device) -> List[float]:
    # Events bracket each call on the stream: the host may queue ahead, and what is timed is the
    # GPU's time from the first kernel of the call to the end of its last (gaps included).
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    torch.cuda.synchronize(device)
    for call in range(count):
        starts[call].record()
        run(input_sets[call % len(input_sets)])
        ends[call].record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def measure(run: Callable[[Any], None], input_sets: Sequence[Any], device: torch.device, *,
            repeats: Optional[int] = None, budget_seconds: float = 1.0) -> List[float]:
    """Per-call times in ms of `run`, cycling through `input_sets`, after a warm-up. Without
    `repeats`, as many calls as fit in `budget_seconds` (between MIN_REPEATS and MAX_REPEATS)."""
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < WARMUP_SECONDS:
        run(input_sets[calls % len(input_sets)])
        _synchronize(device)
        calls += 1
    if repeats is None:
        seconds_per_call = (time.perf_counter() - start) / calls
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(budget_seconds / seconds_per_call)))
    if device.type == "cuda":
        return _timed_calls_cuda(run, input_sets, repeats, device)
    return _timed_calls_cpu(run, input_sets, repeats)



# -- caches and physical limits -----------------------------------------------------------------

def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):  # Linux: "32768K"
        with open(path) as file:
            text = file.read().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=DEFAULT_CPU_CACHE_BYTES)


def input_sets_needed(bytes_moved: int, cache_bytes: int) -> int:
    """How many input sets to rotate so that a call rarely finds its inputs still in the last-level
    cache: enough sets to cover twice the cache. bytes_moved / 2 underestimates a set's footprint
    (exactly right for an in-place sweep), so this errs towards more sets."""
    footprint = max(1, bytes_moved // 2)
    if footprint >= cache_bytes:
        return 1
    return min(MAX_INPUT_SETS, math.ceil(2 * cache_bytes / footprint))


def copy_bandwidth_gbps(device: torch.device, nbytes: int, *, repeats: Optional[int] = None) -> float:
    """Device copy bandwidth: dst.copy_(src) of `nbytes`, counting 2 * nbytes (read + write)."""
    src = torch.rand(nbytes // 4, device=device)    # filled: untouched CPU pages read as the zero page
    dst = torch.empty_like(src)
    samples = measure(lambda _: dst.copy_(src), [None], device, repeats=repeats, budget_seconds=0.5)
    return 2 * src.numel() * 4 / (statistics.median(samples) * 1e-3) / 1e9


def matmul_peak_tflops(device: torch.device, *, repeats: Optional[int] = None) -> float:
    """Dense matmul rate: bf16 8192^3 on CUDA (tensor cores), fp32 1024^3 on CPU."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    samples = measure(lambda _: torch.matmul(a, b, out=out), [None], device, repeats=repeats,
                      budget_seconds=0.5)
    return 2 * size**3 / (statistics.median(samples) * 1e-3) / 1e12
