"""Run llmkernels' CUDA kernels on CPU tensors under its SIMT emulator (docs/emulator.md).

The kernels' own CUDA source, compiled a second time by the host compiler, runs with the threads of
each block as fibers, and checks what compute-sanitizer would: shared memory read before it was
written or outside the block's buffer, data races between barriers, a `cp.async` read before its
wait, global accesses outside the kernel's tensors, barriers or warp collectives that not all
threads reach (a deadlock report, never a hang), launches the hardware refuses. It also counts the
shared-memory bank conflicts of every warp-wide access.

    with llmkernels.emulator.emulate(schedule="shuffled", seed=3):
        llmkernels.mezo.perturb_(params, seed, 1e-3)   # CPU tensors, the CUDA kernel emulated
    print(llmkernels.emulator.report())

It is for finding bugs in kernels, not for speed: an emulated kernel runs orders of magnitude slower
than the CPU kernels. The switch is process-wide.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from ._ext import C

EmulatorError = C.EmulatorError

SCHEDULES = ("ordered", "shuffled")


@contextlib.contextmanager
def emulate(schedule: str = "ordered", seed: int = 0) -> Iterator[None]:
    """Within the block, ops on CPU tensors run the emulated CUDA kernels instead of the CPU kernels.

    `schedule="ordered"` runs a block's threads in index order, each until it reaches a barrier or a
    warp collective (deterministic); `"shuffled"` picks a random order at every step, seeded by
    `seed`, to shake out code that depends on the order threads run in."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64); got {seed!r}")
    previous = C.emulator.settings()
    C.emulator.set_settings(True, schedule, seed)
    try:
        yield
    finally:
        C.emulator.set_settings(*previous)


def enabled() -> bool:
    """True inside `emulate()`."""
    return bool(C.emulator.settings()[0])


def report() -> list:
    """One dict per kernel run under the emulator since `reset_report()`: launches, blocks, threads,
    warp-wide shared-memory accesses, their wavefronts against the conflict-free ideal, and
    `bank_conflicts_by_site` (extra wavefronts by source line)."""
    return list(C.emulator.report())


def reset_report() -> None:
    C.emulator.reset_report()
