"""Benchmark machinery: cases, the registry of case families, timers and the device's limits.

A family module registers one function that builds its cases for a device:

    @register("mezo")
    def cases(device: torch.device, quick: bool) -> list[Case]: ...

Every case times our kernel and a named anchor (what a user would run without us) in the same
process, on the same device, on the same inputs. The runner (runner.py) first checks that each of
the two did its work on a fresh input set, then reports both times (median and interquartile
range), their ratio, and the fraction of a physical limit measured in the same run (copy
bandwidth or matmul peak).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

MIN_REPEATS, MAX_REPEATS = 5, 200
MAX_INPUT_SETS = 32        # rotation cap: memory and setup time grow with every extra set

# Warm-up: first calls pay for allocation, lazy initialization and the GPU clock ramp, and on a
# shared machine other processes come and go. After a fixed 0.1 s warm-up the published MeZO loop
# measured 1141, 488 and 136 ms in three CPU runs while our sweep stayed at 18 ms (ratio 19x, 27x,
# 7.6x). So warm up in batches until two consecutive batch medians agree, and flag the function
# (settled=False) when they never do within the cap.
WARMUP_TOLERANCE = 0.05       # consecutive batch medians within 5% of each other: warm
WARMUP_MIN_SECONDS = 0.1      # never settle sooner (the old fixed warm-up): GPU clocks ramp meanwhile
WARMUP_BATCH_SECONDS = 0.05   # a batch lasts about this long ...
WARMUP_BATCH_CALLS = (3, 1000)  # ... within these call counts (3: a median that ignores one outlier)
WARMUP_MAX_SECONDS = 5.0      # default cap: lets a 0.7 s call settle (1 + 2 batches of 3 calls)

# A case is flagged when our time's or the anchor's interquartile range exceeds this fraction of
# its median. The middle half of the calls then spans more than 10%: the machine changed state
# while we measured (another process on the cores, clocks, the allocator), and a rerun can move
# the median, and the ratio built from it, by as much. Quiet CPU runs of the MeZO cases measured
# IQRs of 0-6%, so 10% flags disturbed runs, not honest noise.
MAX_TRUSTED_SPREAD = 0.10

SHORT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
DEFAULT_L2_BYTES = 50 * 2**20      # H100 L2, if torch does not report it
DEFAULT_CPU_CACHE_BYTES = 32 * 2**20


TARGET_METRICS = ("ratio", "fraction", "tflops")


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal printed under the family's table, never asserted: `metric` >= `minimum`, where metric
    is "ratio" (anchor time / our time), "fraction" (of the physical limit) or "tflops" (our
    kernel's TFLOP/s, an absolute rate: for cases with flops; n/a on a case without)."""
    metric: str
    minimum: float
    text: str

    def __post_init__(self) -> None:
        if self.metric not in TARGET_METRICS:
            raise ValueError(f"Target metric must be one of {TARGET_METRICS}; got {self.metric!r}")

    def met_by(self, record: Dict[str, Any]) -> Optional[bool]:
        value = record.get(self.metric)
        return None if value is None else value >= self.minimum


def short_dtype(dtype: torch.dtype) -> str:
    return SHORT_DTYPES.get(dtype, str(dtype).replace("torch.", ""))


Run = Callable[[Any], None]             # one call of a timed function on one input set
Check = Callable[[Any, Run], None]      # check(inputs, run): run(inputs) once, assert it did its work


@dataclasses.dataclass(frozen=True)
class Case:
    """Our kernel (`run`) against an anchor (`anchor_run`) on the same inputs.

    Each function has its own check, `check(inputs, run)`: given a fresh input set, it calls
    `run(inputs)` once and asserts that the call did its work (outputs written, finite), so that a
    kernel that silently does nothing fails instead of being timed as fast. Two checks rather than
    one, because the two functions may do different work on the same inputs (MeZO's copy anchor
    writes a copy buffer, our sweep the parameters). The check receives `run` instead of calling
    the case's own function so that a caller can hand it the function as it will be timed (e.g.
    wrapped), and the check owns the call so that it can snapshot the inputs before it.

    Cases with the same name, dtype, device and description time the same kernel of ours on the
    same inputs, against different anchors (pytest-benchmark times that kernel once).
    """
    name: str                       # "mezo.update": the family, a dot, the op
    description: str                # shapes or parameter count, for the table
    dtype: torch.dtype
    device: torch.device
    setup: Callable[[], Any]        # fresh random inputs (never zeros); called once per input set
    run: Run                        # our kernel on one input set
    check: Check                    # asserts that `run` did its work (see above)
    anchor_name: str
    anchor_run: Run
    anchor_check: Check
    bytes_moved: int                # bytes our kernel reads + writes per call
    flops: Optional[int] = None     # set for compute-bound cases: TFLOP/s against the matmul peak
    targets: Sequence[Target] = ()
    family: str = ""                # set by the registry

    def labels(self) -> Tuple[str, ...]:
        """What --filter matches: op name, family, dtype ("bf16") and anchor name."""
        return (self.name, self.family, short_dtype(self.dtype), self.anchor_name)

    def functions(self) -> List[Tuple[str, Run, Check]]:
        """(side, run, check) for our kernel and the anchor."""
        return [("ours", self.run, self.check), ("anchor", self.anchor_run, self.anchor_check)]


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

def _timed_calls_cpu(run: Run, input_sets: Sequence[Any], count: int, first: int) -> List[float]:
    samples = []
    for call in range(first, first + count):
        inputs = input_sets[call % len(input_sets)]
        start = time.perf_counter()
        run(inputs)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _timed_calls_cuda(run: Run, input_sets: Sequence[Any], count: int, first: int,
                      device: torch.device) -> List[float]:
    # Events bracket each call on the stream: the host may queue ahead, and what is timed is the
    # GPU's time from the first kernel of the call to the end of its last (gaps included).
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    torch.cuda.synchronize(device)
    for index, call in enumerate(range(first, first + count)):
        starts[index].record()
        run(input_sets[call % len(input_sets)])
        ends[index].record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def timed_calls(run: Run, input_sets: Sequence[Any], count: int, device: torch.device, *,
                first: int = 0) -> List[float]:
    """ms per call of `count` calls, on input sets first, first + 1, ... (mod len(input_sets)),
    so that warm-up and measurement continue one rotation instead of both starting at set 0."""
    if device.type == "cuda":
        return _timed_calls_cuda(run, input_sets, count, first, device)
    return _timed_calls_cpu(run, input_sets, count, first)


@dataclasses.dataclass
class Timing:
    """Per-call times of one function after its warm-up, in ms."""
    samples: List[float]
    warmup_calls: int
    warmup_seconds: float
    settled: bool       # two consecutive warm-up batches agreed within WARMUP_TOLERANCE

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        """Interquartile range (q3 - q1): the spread of the middle half, blind to a lone outlier
        (one page-fault storm or preempted call) that a min-max range would report."""
        if len(self.samples) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q3 - q1

    @property
    def spread(self) -> float:
        """IQR as a fraction of the median."""
        return self.iqr / self.median if self.median > 0 else math.inf


def _batch_calls(ms_per_call: float) -> int:
    low, high = WARMUP_BATCH_CALLS
    return min(high, max(low, math.ceil(WARMUP_BATCH_SECONDS * 1e3 / max(ms_per_call, 1e-6))))


def measure(run: Run, input_sets: Sequence[Any], device: torch.device, *, repeats: Optional[int] = None,
            budget_seconds: float = 1.0, warmup_max_seconds: float = WARMUP_MAX_SECONDS) -> Timing:
    """Times `run`, cycling through `input_sets`, after a warm-up in batches that ends when two
    consecutive batch medians agree within WARMUP_TOLERANCE (or at `warmup_max_seconds`, with
    `settled` False). Without `repeats`, as many timed calls as fit in `budget_seconds` at the
    warm time per call (between MIN_REPEATS and MAX_REPEATS)."""
    start = time.perf_counter()
    ms_per_call = timed_calls(run, input_sets, 1, device)[0]   # the first call alone: it pays for first-call costs
    calls, previous = 1, None
    while True:
        batch = timed_calls(run, input_sets, _batch_calls(ms_per_call), device, first=calls)
        calls += len(batch)
        ms_per_call = statistics.median(batch)
        elapsed = time.perf_counter() - start
        settled = (previous is not None
                   and abs(ms_per_call - previous) <= WARMUP_TOLERANCE * min(ms_per_call, previous))
        if (settled and elapsed >= WARMUP_MIN_SECONDS) or elapsed >= warmup_max_seconds:
            break
        previous = ms_per_call
    if repeats is None:
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(budget_seconds * 1e3 / max(ms_per_call, 1e-6))))
    samples = timed_calls(run, input_sets, repeats, device, first=calls)
    return Timing(samples, warmup_calls=calls, warmup_seconds=elapsed, settled=settled)


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
    timing = measure(lambda _: dst.copy_(src), [None], device, repeats=repeats, budget_seconds=0.5)
    return 2 * src.numel() * 4 / (timing.median * 1e-3) / 1e9


def matmul_peak_tflops(device: torch.device, *, repeats: Optional[int] = None) -> float:
    """Dense matmul rate: bf16 8192^3 on CUDA (tensor cores), fp32 1024^3 on CPU."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    timing = measure(lambda _: torch.matmul(a, b, out=out), [None], device, repeats=repeats,
                     budget_seconds=0.5)
    return 2 * size**3 / (timing.median * 1e-3) / 1e12


# -- helpers for the families' checks -----------------------------------------------------------

def poison_next_allocations(shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> None:
    """For calls that allocate their outputs: NaN-filled blocks of the outputs' sizes, all alive at
    once and then freed, are where torch's CUDA caching allocator most likely puts those outputs, so
    an output the call never writes reads NaN. Only likely (the allocator may split, merge or pick
    another free block, and the CPU allocator hands freed memory back to malloc); what a check relies
    on is that its input set is fresh: no earlier correct result for these inputs exists anywhere in
    memory, so an output the call did not write cannot pass the comparison with an oracle."""
    poison = [torch.full(tuple(shape), float("nan"), dtype=dtype, device=device) for shape in shapes]
    del poison


def spread_rows(count: int, limit: int, device: torch.device) -> torch.Tensor:
    """Up to `limit` row indices (int64) spread evenly over [0, count), first and last included: the
    rows a check compares with its oracle."""
    if count <= limit:
        return torch.arange(count, device=device)
    return torch.linspace(0, count - 1, limit, device=device).round().long().unique()
