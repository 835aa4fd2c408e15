"""pytest-benchmark suite over every case of every family of `python -m llmkernels bench`, at
--quick sizes: our kernel and its anchor in one group, on the CPU and, when llmkernels says CUDA is
usable, on the GPU. Each function first passes its case's check on a fresh input set (a kernel
that does nothing fails here instead of being timed). From the repository root, with the package
installed:

    python -m pytest bench/test_bench.py                       # time them
    python -m pytest bench/test_bench.py --benchmark-disable   # check each and run it once
    python -m pytest bench/test_bench.py -k bf16               # select by op, family, dtype, anchor

The runner is the report (ratios, spread, fraction of copy bandwidth, targets); this suite is for
pytest-benchmark's history: --benchmark-autosave, then --benchmark-compare between commits.
"""
import itertools

import pytest
import torch

import llmkernels
from llmkernels.bench import core

pytestmark = pytest.mark.bench

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if llmkernels.cuda_usable() else [])
CASES = [case for device in DEVICES for case in core.build_cases(device, quick=True)]


def timed_functions():
    """(case, side) pairs: each anchor once, and our kernel once per op, dtype, device and shape
    (cases that share those share our kernel and differ only in the anchor)."""
    pairs, ours_seen = [], set()
    for case in CASES:
        name = f"{case.name}-{core.short_dtype(case.dtype)}-{case.device.type}"   # names start with the family
        if (name, case.description) not in ours_seen:
            ours_seen.add((name, case.description))
            pairs.append(pytest.param(case, "ours", id=f"{name}-ours"))
        pairs.append(pytest.param(case, "anchor", id=f"{name}-{case.anchor_name.replace(' ', '-')}"))
    return pairs


def synchronized(run, device: torch.device):
    """The timed function: on CUDA it waits for the kernels, or only the launch would be timed."""
    if device.type != "cuda":
        return run

    def run_and_wait(inputs):
        run(inputs)
        torch.cuda.synchronize(device)
    return run_and_wait


@pytest.mark.parametrize("case, side", timed_functions())
def test_bench(benchmark, case, side):
    run, check = {name: (run, check) for name, run, check in case.functions()}[side]
    check(case.setup(), run)

    # Rotate input sets as the runner does, so a set that fits in the last-level cache is not flattered.
    input_sets = [case.setup() for _ in range(core.input_sets_needed(case.bytes_moved,
                                                                      core.last_level_cache_bytes(case.device)))]
    rotation = itertools.cycle(input_sets)
    benchmark.group = f"{case.name} {core.short_dtype(case.dtype)} {case.device.type}: {case.description}"
    benchmark.extra_info.update(bytes_moved=case.bytes_moved, anchor=case.anchor_name)
    benchmark.pedantic(synchronized(run, case.device), setup=lambda: ((next(rotation),), {}),
                       rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("family", ["mezo", "gemm", "quant", "moe", "lora"])
def test_cuda_case_list_builds_without_touching_cuda(family):
    """Building a family's CUDA case list allocates nothing and touches no device: it works with a torch
    built without CUDA and leaves CUDA uninitialized. (attention's list probes SDPA's backends on the
    device, so it is not among these.)"""
    initialized = torch.cuda.is_initialized()
    cases = core._FAMILIES[family](torch.device("cuda"), False)
    assert cases and all(case.device.type == "cuda" for case in cases)
    assert torch.cuda.is_initialized() == initialized
