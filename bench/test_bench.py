"""pytest-benchmark suite over the MeZO cases of `python -m llmkernels bench`, at --quick sizes:
our kernel and its anchor in one group, on the CPU and, when there is one, the GPU.

    PYTHONPATH=python python3 -m pytest bench/test_bench_mezo.py                      # time them
    PYTHONPATH=python python3 -m pytest bench/test_bench_mezo.py --benchmark-disable  # each call once

The runner is the report (ratios, fraction of copy bandwidth, targets); this suite is for
pytest-benchmark's history: --benchmark-autosave, then --benchmark-compare between commits.
"""
import itertools

import pytest
import torch

import llmkernels
from llmkernels.bench import core
from llmkernels.bench.mezo import cases
from llmkernels.bench.runner import short_dtype

pytestmark = pytest.mark.bench

DEVICES = [torch.device("cpu")]
if torch.cuda.is_available() and llmkernels.build_info()["cuda_compiled"]:
    DEVICES.append(torch.device("cuda"))
CASES = [case for device in DEVICES for case in cases(device, quick=True)]


def timed_functions():
    """(case, side) pairs: each anchor once, our kernel once per op, dtype and device (two update
    cases share it, with different anchors)."""
    pairs, ours_seen = [], set()
    for case in CASES:
        name = f"{case.name}-{short_dtype(case.dtype)}-{case.device.type}"
        if name not in ours_seen:
            ours_seen.add(name)
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
def test_mezo(benchmark, case, side):
    # Rotate input sets as the runner does, so a set that fits in the last-level cache is not flattered.
    input_sets = [case.setup() for _ in range(core.input_sets_needed(case.bytes_moved,
                                                                      core.last_level_cache_bytes(case.device)))]
    first = input_sets[0]   # the first round (the only one under --benchmark-disable) runs on it
    params_before = [p.clone() for p in first.params]
    rotation = itertools.cycle(input_sets)
    benchmark.group = f"{case.name} {short_dtype(case.dtype)} {case.device.type}: {case.description}"
    benchmark.extra_info.update(bytes_moved=case.bytes_moved, anchor=case.anchor_name)
    run = case.run if side == "ours" else case.anchor_run
    benchmark.pedantic(synchronized(run, case.device), setup=lambda: ((next(rotation),), {}),
                       rounds=10, warmup_rounds=2)

    # The timed function did its work: every tensor of the list written (a multi-tensor sweep that
    # skips one is a real bug), nothing NaN; the copy anchor copied.
    if side == "anchor" and case.anchor_name == "device copy":
        assert torch.equal(first.copy_dst, first.copy_src)
    else:
        for index, (param, before) in enumerate(zip(first.params, params_before)):
            assert torch.isfinite(param).all(), f"params[{index}] has non-finite values"
            assert not torch.equal(param, before), f"params[{index}] ({tuple(param.shape)}) was not updated"
