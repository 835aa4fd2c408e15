"""The SIMT emulator's own tests, on purpose-built CUDA kernels (csrc/testing/emulator_kernels.cu).

Correct kernels: the emulated output against an independent model written here (shuffles from
PTX shfl.sync's pseudo-code, reductions in the kernel's fixed order in float32), under both
schedules and several seeds, and the same bits under every schedule. Buggy kernels: each planted
bug must raise EmulatorError naming the problem and the kernel's source line (found by its
`// @marker` comment in the .cu file). Also: a deadlock is reported (never a hang), emulate()
restores the settings, report() counts launches, blocks and bank conflicts exactly. The `cuda` test
runs every correct kernel on the GPU and compares with the emulator bit for bit."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import llmkernels
from llmkernels._ext import C
from llmkernels.emulator import EmulatorError, emulate

KERNEL_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "testing" / "emulator_kernels.cu"
SOURCE_LINES = KERNEL_SOURCE.read_text().splitlines()

SCHEDULES = [("ordered", 0), ("shuffled", 1), ("shuffled", 2), ("shuffled", 7)]
SCHEDULE_IDS = [f"{s}-{seed}" for s, seed in SCHEDULES]


def line_of(marker: str) -> int:
    hits = [n for n, text in enumerate(SOURCE_LINES, 1) if text.rstrip().endswith(f"// @{marker}")]
    assert len(hits) == 1, f"marker @{marker} found {len(hits)} times in {KERNEL_SOURCE}"
    return hits[0]


def site(marker: str) -> str:
    """A regex for the emulator's name of the marked line: testing/emulator_kernels.cu:N."""
    return re.escape(f"testing/emulator_kernels.cu:{line_of(marker)}") + r"(?!\d)"


def run(name: str, out: torch.Tensor, inp: torch.Tensor | None = None) -> torch.Tensor:
    stream = torch.cuda.current_stream(out.device).cuda_stream if out.is_cuda else 0
    C.testing.emulator_kernel(name, to_dlpack(out), None if inp is None else to_dlpack(inp), stream)
    return out


def i32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def float_bits(f: float) -> int:
    return struct.unpack("<i", struct.pack("<f", f))[0]


FULL = 0xFFFFFFFF

# -- the models of the correct kernels --------------------------------------------------------------


def shfl(values, mode: str, b, width: int = 32, mask: int = FULL):
    """PTX shfl.sync as CUDA's __shfl*_sync call it: b[4:0] is the lane or offset, c packs the
    segment mask (32 - width) << 8 and the clamp (0 for up, 31 otherwise). Lanes outside `mask` get None."""
    segmask = (32 - width) & 31
    clamp = 0 if mode == "up" else 31
    out = [None] * 32
    for lane in range(32):
        if not (mask >> lane) & 1:
            continue
        bval = (b(lane) if callable(b) else b) & 31
        max_lane = (lane & segmask) | (clamp & ~segmask & 31)
        min_lane = lane & segmask
        if mode == "idx":
            j = min_lane | (bval & ~segmask & 31)
            valid = j <= max_lane
        elif mode == "up":
            j = lane - bval
            valid = j >= max_lane
        elif mode == "down":
            j = lane + bval
            valid = j <= max_lane
        else:  # bfly
            j = lane ^ bval
            valid = j <= max_lane
        if not valid:
            j = lane
        assert (mask >> j) & 1, "the kernel only shuffles from lanes in the mask"
        out[lane] = values[j]
    return out


def test_shuffle_model_by_hand():
    """The model against values worked out from the CUDA programming guide."""
    lanes = list(range(32))
    assert shfl(lanes, "idx", 3, 8)[:16] == [3] * 8 + [11] * 8
    assert shfl(lanes, "idx", lambda l: l + 5, 8)[:8] == [5, 6, 7, 0, 1, 2, 3, 4]
    assert shfl(lanes, "up", 3, 8)[8:16] == [8, 9, 10, 8, 9, 10, 11, 12]
    assert shfl(lanes, "down", 5, 8)[:8] == [5, 6, 7, 3, 4, 5, 6, 7]
    # xor past the width: earlier segments are readable, later ones return the own value
    xor12 = shfl(lanes, "bfly", 12, 8)
    assert xor12[0] == 0 and xor12[4] == 4 and xor12[12] == 0 and xor12[8] == 4 and xor12[16] == 16 and xor12[28] == 16


def ballot(predicates, lanes) -> int:
    return sum(1 << l for l in lanes if predicates[l])


WARP_SLOTS = 28
NOT_COMPUTED = 0x5A5A5A5A


def warp_ops_model(inp: torch.Tensor) -> torch.Tensor:
    values = inp.tolist()
    rows = []
    for w in range(len(values) // 32):
        v = values[32 * w: 32 * w + 32]
        lanes = range(32)
        low, high, even = range(16), range(16, 32), range(0, 32, 2)
        u = [x & 0xFFFFFFFF for x in v]
        cols = [
            shfl(v, "idx", lambda l: (l * 7 + 3) & 31),
            shfl(v, "idx", lambda l: l + 5, 8),
            shfl(v, "up", 3), shfl(v, "up", 3, 8),
            shfl(v, "down", 5), shfl(v, "down", 5, 8),
            shfl(v, "bfly", 9), shfl(v, "bfly", 3, 8), shfl(v, "bfly", 12, 8),
            [i32(ballot([x & 1 for x in v], lanes))] * 32,
            [int(any((x & 15) == 3 for x in v))] * 32,
            [int(all(x > -990 for x in v))] * 32,
            [i32(sum(v))] * 32, [min(v)] * 32, [max(v)] * 32,
            [i32(min(u))] * 32, [i32(max(u))] * 32,
            [float_bits(x * 0.5) for x in shfl(v, "bfly", 1)],
        ]
        wide = shfl([(x & 0xFFFFFFFF) << 32 | l for l, x in enumerate(v)], "down", 2)
        cols.append([i32(x >> 32) for x in wide])
        cols.append([i32(x) for x in wide])
        lo_mask, hi_mask, even_mask = 0x0000FFFF, 0xFFFF0000, 0x55555555
        part = [[NOT_COMPUTED] * 32 for _ in range(8)]
        for l, x in zip(low, shfl(v, "bfly", 5, 32, lo_mask)[:16]):
            part[0][l] = x
        for l, x in zip(low, shfl(v, "down", 4, 16, lo_mask)[:16]):
            part[1][l] = x
        for l in low:
            part[2][l] = ballot([x > 0 for x in v], low)
            part[3][l] = sum(v[k] for k in low)
            part[4][l] = int(all(v[k] & 1 for k in low))
        for l, x in zip(high, shfl(v, "idx", 3, 8, hi_mask)[16:]):
            part[0][l] = x
        for l, x in zip(high, shfl(v, "up", 1, 16, hi_mask)[16:]):
            part[1][l] = x
        for l in high:
            part[2][l] = i32(ballot([x < 0 for x in v], high))
            part[3][l] = max(v[k] for k in high)
            part[4][l] = int(any(v[k] & 1 for k in high))
        xor2 = shfl(v, "bfly", 2, 32, even_mask)
        for l in even:
            part[5][l] = xor2[l]
            part[6][l] = i32(min(u[k] for k in even))
            part[7][l] = even_mask
        cols += part
        assert len(cols) == WARP_SLOTS
        rows += [[col[l] for col in cols] for l in lanes]
    return torch.tensor(rows, dtype=torch.int32)


def tile_normalize_model(x: torch.Tensor) -> torch.Tensor:
    tiles = x.reshape(-1, 256)
    s = tiles.clone()
    stride = 128
    while stride:
        s[:, :stride] = s[:, :stride] + s[:, stride:2 * stride]  # float32, the kernel's tree
        stride //= 2
    return (tiles - s[:, :1] * (1.0 / 256)).reshape(x.shape)


def atomics_model(inp: torch.Tensor) -> torch.Tensor:
    v = inp.tolist()
    ints = [sum(v[i::8]) for i in range(8)]
    floats = torch.tensor([sum(x * 0.25 for x in v[i::8]) for i in range(8)], dtype=torch.float64).float()
    return torch.cat([torch.tensor(ints, dtype=torch.int32), floats.view(torch.int32)])


def coordinates_model() -> torch.Tensor:
    rows = []
    for by in range(2):
        for bx in range(3):
            for tz in range(2):
                for ty in range(3):
                    for tx in range(4):
                        rows.append([tx, ty, tz, bx, by, 0, 4, 3, 2, 3, 2, 1])
    return torch.tensor(rows, dtype=torch.int32)


def warp_exchange_model(inp: torch.Tensor) -> torch.Tensor:
    values = inp.tolist()
    rows = []
    for w in range(len(values) // 32):
        v = values[32 * w: 32 * w + 32]
        reversed_ = [v[31 - l] for l in range(32)]
        rewritten = [reversed_[l] * 3 + l for l in range(32)]
        rotated = [rewritten[(l & 16) + ((l + 1) & 15)] for l in range(32)]
        summed = [rotated[l] + v[l] for l in range(32)]
        rows += [[reversed_[l], rotated[l], summed[l ^ 8]] for l in range(32)]
    return torch.tensor(rows, dtype=torch.int32)


def bank_conflicts_model(blocks: int) -> torch.Tensor:
    # s[k] = k: s[32 l] + s[l] + s[2 l] + s[4 l .. 4 l + 3]
    return torch.tensor([32 * l + l + 2 * l + 16 * l + 6 for l in range(32)] * blocks, dtype=torch.int32)


def ints(n: int, seed: int, low: int = -1000, high: int = 1001) -> torch.Tensor:
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


# name -> (inputs(seed, device) -> (out, input), model(input) -> expected output)
CORRECT = {
    "tile_normalize": (
        lambda seed, dev: (torch.full((2 * 768,), float("nan"), device=dev),
                           (torch.randn(2 * 768, generator=torch.Generator().manual_seed(seed)) * 3 + 1).to(dev)),
        tile_normalize_model),
    "warp_ops": (
        lambda seed, dev: (torch.full((128, WARP_SLOTS), -1, dtype=torch.int32, device=dev), ints(128, seed).to(dev)),
        warp_ops_model),
    "atomics": (
        lambda seed, dev: (torch.zeros(16, dtype=torch.int32, device=dev), ints(4700, seed).to(dev)),
        atomics_model),
    "coordinates": (
        lambda seed, dev: (torch.full((144, 12), -1, dtype=torch.int32, device=dev), None),
        lambda _: coordinates_model()),
    "warp_exchange": (
        lambda seed, dev: (torch.full((256, 3), -1, dtype=torch.int32, device=dev), ints(256, seed).to(dev)),
        warp_exchange_model),
    "bank_conflicts": (
        lambda seed, dev: (torch.full((64,), -1, dtype=torch.int32, device=dev), None),
        lambda _: bank_conflicts_model(2)),
}


def run_correct(name: str, seed: int, device: str = "cpu"):
    make, model = CORRECT[name]
    out, inp = make(seed, device)
    run(name, out, inp)
    return out, inp, model


@pytest.mark.parametrize("schedule,seed", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_kernel_matches_model(name, schedule, seed):
    with emulate(schedule=schedule, seed=seed):
        out, inp, model = run_correct(name, seed)
    expected = model(None if inp is None else inp.cpu())
    torch.testing.assert_close(out.view(expected.shape), expected, rtol=0, atol=0, equal_nan=False)


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_same_bits_under_every_schedule(name):
    outputs = []
    for schedule, seed in SCHEDULES:
        with emulate(schedule=schedule, seed=seed):
            out, _, _ = run_correct(name, 3)
        outputs.append(out.view(torch.int32))
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(CORRECT))
def test_gpu_matches_emulator_bit_for_bit(name):
    emulated, _, _ = run_correct(name, 5, "cpu")
    on_gpu, _, _ = run_correct(name, 5, "cuda")
    torch.cuda.synchronize()
    assert torch.equal(emulated.view(torch.int32), on_gpu.cpu().view(torch.int32))


# -- the planted bugs ----------------------------------------------------------------------------------

def buggy(name: str, schedule: str = "ordered", seed: int = 0, inp: torch.Tensor | None = None, out=None):
    with emulate(schedule=schedule, seed=seed):
        run(name, torch.zeros(64, dtype=torch.int32) if out is None else out, inp)


WHO = r"kernel '{}' block \(0,0,0\) thread \((\d+),0,0\) \(warp \d+, lane \d+\) at "


@pytest.mark.parametrize("schedule,seed", SCHEDULES, ids=SCHEDULE_IDS)
def test_missing_syncthreads_is_a_race(schedule, seed):
    w, r = site("race_write"), site("race_read")
    pattern = (WHO.format("race_missing_syncthreads") + f"({w}|{r}): data race on shared memory byte \\d+: "
               f"this thread (writes|reads) it at ({w}|{r}), thread \\(\\d+,0,0\\) (read|wrote) it at ({w}|{r})")
    with pytest.raises(EmulatorError, match=pattern):
        buggy("race_missing_syncthreads", schedule, seed)


def test_missing_syncthreads_report_in_order():
    """The ordered schedule runs warp 0 first: warp 1's first write finds warp 0's read."""
    with pytest.raises(EmulatorError) as error:
        buggy("race_missing_syncthreads")
    assert str(error.value) == (
        f"kernel 'race_missing_syncthreads' block (0,0,0) thread (32,0,0) (warp 1, lane 0) at "
        f"testing/emulator_kernels.cu:{line_of('race_write')}: data race on shared memory byte 128: this thread "
        f"writes it at testing/emulator_kernels.cu:{line_of('race_write')}, thread (0,0,0) read it at "
        f"testing/emulator_kernels.cu:{line_of('race_read')}, with no __syncthreads() (or __syncwarp() of both) between")


@pytest.mark.parametrize("schedule,seed", SCHEDULES, ids=SCHEDULE_IDS)
def test_missing_trailing_barrier_is_a_write_after_read_race(schedule, seed):
    store, total = site("tile_store"), site("tile_total")
    pattern = (WHO.format("tile_normalize_no_trailing_barrier") + f"({store}|{total}): data race on shared memory "
               f"byte [0-3]: this thread (writes|reads) it at ({store}|{total}), thread \\(\\d+,0,0\\) (\\(among other "
               f"threads\\) )?(read|wrote) it at ({store}|{total})")
    x = torch.randn(2 * 768, generator=torch.Generator().manual_seed(seed))
    with pytest.raises(EmulatorError, match=pattern):
        buggy("tile_normalize_no_trailing_barrier", schedule, seed, inp=x, out=torch.empty_like(x))


@pytest.mark.parametrize("schedule,seed", SCHEDULES[:2], ids=SCHEDULE_IDS[:2])
def test_read_of_unwritten_shared_memory(schedule, seed):
    with pytest.raises(EmulatorError, match=WHO.format("poison_read") + site("poison_read") +
                       r": shared-memory read of 4 bytes at offset \d+ before byte \d+ was written \(shared memory "
                       r"is poisoned at block start\)"):
        buggy("poison_read", schedule, seed)


@pytest.mark.parametrize("schedule,seed", SCHEDULES[:2], ids=SCHEDULE_IDS[:2])
def test_shared_access_out_of_bounds(schedule, seed):
    pattern = (r"kernel 'shared_out_of_bounds' block \(0,0,0\) thread \(63,0,0\) \(warp 1, lane 31\) at "
               + site("shared_oob_read") + r": shared-memory read of 4 bytes at offset 256 is outside the block's "
               r"256 bytes of dynamic shared memory")
    with pytest.raises(EmulatorError, match=pattern):
        buggy("shared_out_of_bounds", schedule, seed)


def test_global_access_outside_the_operands():
    """`i <= n`: thread n reads input[n], inside the buffer the view was cut from but outside the view."""
    n = 100
    buffer = torch.arange(2 * n, dtype=torch.int32)
    pattern = (r"kernel 'global_off_by_one' block \(1,0,0\) thread \(36,0,0\) \(warp 1, lane 4\) at "
               + site("global_tail") + r": global-memory read of 4 bytes outside the kernel's operands "
               r"\(nearest: input \[400 bytes\], at byte offset 400\)")
    with pytest.raises(EmulatorError, match=pattern):
        buggy("global_off_by_one", inp=buffer[:n], out=torch.zeros(n, dtype=torch.int32))


@pytest.mark.parametrize("schedule,seed", SCHEDULES, ids=SCHEDULE_IDS)
def test_syncthreads_in_divergent_code(schedule, seed):
    a, b = site("divergent_a"), site("divergent_b")
    pattern = (WHO.format("divergent_syncthreads") + f"({a}|{b}): __syncthreads\\(\\) reached at two places: here, "
               f"and at ({a}|{b}) by thread \\(\\d+,0,0\\) \\(a barrier in divergent code\\)")
    with pytest.raises(EmulatorError, match=pattern) as error:
        buggy("divergent_syncthreads", schedule, seed)
    message = str(error.value)
    assert re.search(a, message) and re.search(b, message), "both barriers are named"


@pytest.mark.parametrize("schedule,seed", SCHEDULES[:2], ids=SCHEDULE_IDS[:2])
def test_barrier_after_early_return_is_a_deadlock(schedule, seed):
    pattern = (r"^deadlock in kernel 'barrier_after_early_return' block \(0,0,0\): no thread can continue\. "
               r"Where each thread is:\n  threads 0\.\.47: waits at __syncthreads\(\) at "
               + site("early_return_barrier") + r"\n  threads 48\.\.63: exited$")
    with pytest.raises(EmulatorError, match=pattern):
        buggy("barrier_after_early_return", schedule, seed)


def test_shuffle_that_half_the_warp_skips_is_a_deadlock():
    waits = r"waits at __shfl_xor_sync\(mask 0xffffffff\) at " + site("missing_lanes_shuffle")
    barrier = r"waits at __syncthreads\(\) at " + site("missing_lanes_barrier")
    pattern = (r"^deadlock in kernel 'shuffle_missing_lanes' block \(0,0,0\): no thread can continue\. Where each "
               rf"thread is:\n  threads 0\.\.15: {waits}\n  threads 16\.\.31: {barrier}\n  threads 32\.\.47: {waits}\n"
               rf"  threads 48\.\.63: {barrier}$")
    with pytest.raises(EmulatorError, match=pattern):
        buggy("shuffle_missing_lanes", "shuffled", 4)


@pytest.mark.parametrize("schedule,seed", SCHEDULES[:2], ids=SCHEDULE_IDS[:2])
def test_shuffle_mask_that_excludes_the_calling_lane(schedule, seed):
    pattern = (r"kernel 'shuffle_mask_excludes_lane' block \(0,0,0\) thread \((0|32),0,0\) \(warp [01], lane 0\) at "
               + site("excluding_mask") + r": __shfl_sync with mask 0xfffffffe that excludes the calling lane 0")
    with pytest.raises(EmulatorError, match=pattern):
        buggy("shuffle_mask_excludes_lane", schedule, seed)


@pytest.mark.parametrize("schedule,seed", SCHEDULES, ids=SCHEDULE_IDS)
def test_lanes_in_different_collectives(schedule, seed):
    s, b = site("mismatch_shuffle"), site("mismatch_ballot")
    calls = r"(__shfl_xor_sync|__ballot_sync)\(mask 0xffffffff\)"
    pattern = (WHO.format("collective_mismatch") + f"({s}|{b}): lanes of warp [01] disagree: lane \\d+ calls "
               f"{calls} while lane \\d+ waits in {calls} at ({s}|{b})")
    with pytest.raises(EmulatorError, match=pattern) as error:
        buggy("collective_mismatch", schedule, seed)
    message = str(error.value)
    assert re.search(s, message) and re.search(b, message), "both collectives are named"


def test_launches_the_hardware_refuses():
    with pytest.raises(EmulatorError, match=r"launch of kernel 'launch_too_many_threads' refused: block "
                                            r"\(1025,1,1\) \(at most 1024 threads"):
        buggy("launch_too_many_threads")
    with pytest.raises(EmulatorError, match=r"launch of kernel 'launch_too_much_shared' refused: 102400 bytes of "
                                            r"dynamic shared memory is over the 101376-byte opt-in limit"):
        buggy("launch_too_much_shared")


def test_unknown_kernel_and_wrong_shapes():
    with pytest.raises(ValueError, match="unknown emulator test kernel 'no_such_kernel'"):
        run("no_such_kernel", torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs an input tensor"):
        run("warp_ops", torch.zeros(64 * WARP_SLOTS, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 64"):
        run("warp_ops", torch.zeros(65 * WARP_SLOTS, dtype=torch.int32), torch.zeros(65, dtype=torch.int32))


# -- settings and the report -----------------------------------------------------------------------------

def test_emulate_restores_the_settings():
    before = C.emulator.settings()
    assert before[0] is False
    with emulate(schedule="shuffled", seed=5):
        assert C.emulator.settings() == (True, "shuffled", 5)
        assert llmkernels.emulator.enabled()
        with emulate():
            assert C.emulator.settings() == (True, "ordered", 0)
        assert C.emulator.settings() == (True, "shuffled", 5)
    assert C.emulator.settings() == before
    with pytest.raises(EmulatorError):
        with emulate(schedule="shuffled", seed=9):
            run("race_missing_syncthreads", torch.zeros(64, dtype=torch.int32))
    assert C.emulator.settings() == before
    with pytest.raises(ValueError, match="schedule must be one of"):
        with emulate(schedule="random"):
            pass
    with pytest.raises(ValueError, match="seed must be"):
        with emulate(seed=-1):
            pass
    assert C.emulator.settings() == before and not llmkernels.emulator.enabled()


def test_report_counts_launches_blocks_and_bank_conflicts():
    llmkernels.emulator.reset_report()
    assert llmkernels.emulator.report() == []
    out = torch.zeros(2 * 32, dtype=torch.int32)  # 2 blocks of one warp
    with emulate(schedule="shuffled", seed=11):
        run("bank_conflicts", out)
        run("bank_conflicts", out)
    run("coordinates", torch.zeros(144 * 12, dtype=torch.int32))
    report = {entry["kernel"]: entry for entry in llmkernels.emulator.report()}
    assert set(report) == {"bank_conflicts", "coordinates"}
    blocks = 4  # 2 launches x 2 blocks
    # per block: fill 32 accesses x 1 wavefront; stride 32 words: 32 (31 extra); stride 1: 1;
    # stride 2 words: 2 (1 extra); 16 bytes a lane, contiguous: 4 quarter-warp phases of 1.
    assert report["bank_conflicts"] == {
        "kernel": "bank_conflicts", "launches": 2, "blocks": blocks, "threads": blocks * 32,
        "shared_accesses": blocks * (32 + 4),
        "shared_wavefronts": blocks * (32 + 32 + 1 + 2 + 4),
        "shared_ideal_wavefronts": blocks * (32 + 1 + 1 + 1 + 4),
        "bank_conflicts_by_site": {f"testing/emulator_kernels.cu:{line_of('bank_stride32')}": blocks * 31,
                                   f"testing/emulator_kernels.cu:{line_of('bank_stride2')}": blocks * 1},
    }
    assert report["coordinates"]["launches"] == 1
    assert report["coordinates"]["blocks"] == 6 and report["coordinates"]["threads"] == 6 * 24
    assert report["coordinates"]["shared_accesses"] == 0
    llmkernels.emulator.reset_report()
    assert llmkernels.emulator.report() == []


def test_warp_exchange_uses_no_block_barrier():
    """The __syncwarp()-ordered exchange is race-free without __syncthreads(): its shared accesses
    are counted (so they were checked), and no error was raised."""
    llmkernels.emulator.reset_report()
    with emulate(schedule="shuffled", seed=3):
        run_correct("warp_exchange", 0)
    (entry,) = llmkernels.emulator.report()
    assert entry["kernel"] == "warp_exchange" and entry["shared_accesses"] == 2 * 4 * 6  # 8 warps, 6 each


# -- checks added after review: alignment, writes under a pending cp.async, spin-waits, exited lanes --

def test_misaligned_vector_access_is_reported():
    pattern = (WHO.format("misaligned_vector") + site("misaligned_store")
               + r": global-memory write of 8 bytes at an address not aligned to 8 bytes")
    with pytest.raises(EmulatorError, match=pattern):
        buggy("misaligned_vector")


@pytest.mark.parametrize("schedule,seed", SCHEDULES[:2], ids=SCHEDULE_IDS[:2])
def test_write_to_bytes_a_cp_async_has_not_landed_is_reported(schedule, seed):
    pattern = (WHO.format("write_while_copy_pending") + site("write_pending")
               + r": shared-memory write of 4 bytes at offset 0 while the cp.async that writes byte 0 \(issued by "
               r"thread \(0,0,0\) at " + site("pending_copy") + r"\) is in flight")
    with pytest.raises(EmulatorError, match=pattern):
        buggy("write_while_copy_pending", schedule, seed, out=torch.arange(64, dtype=torch.int32))


def test_second_cp_async_onto_pending_bytes_is_reported():
    pattern = WHO.format("copy_twice") + site("copy_twice") + r": cp.async to 16 bytes at offset 0 while the cp.async"
    with pytest.raises(EmulatorError, match=pattern):
        buggy("copy_twice", out=torch.arange(64, dtype=torch.int32))


def test_endless_spin_wait_is_reported_not_a_hang():
    pattern = (r"kernel 'spin_forever' block \(0,0,0\): every running thread has only spun \(__nanosleep\) for "
               r"1048576 rounds.*\n  threads 0\.\.0: spins \(__nanosleep\) at " + site("spin")
               + r"\n  threads 1\.\.63: exited$")
    with pytest.raises(EmulatorError, match=pattern):
        buggy("spin_forever")


@pytest.mark.parametrize("schedule,seed", SCHEDULES, ids=SCHEDULE_IDS)
def test_broadcast_read_ordered_by_syncwarp_and_collectives_after_lanes_exit_are_clean(schedule, seed):
    out = torch.zeros(64, dtype=torch.int32)
    buggy("broadcast_then_exit", schedule, seed, out=out)   # no report
    lane = torch.arange(64) % 32
    expected = torch.where(lane < 16, 7 + (torch.arange(64) ^ 1), torch.full((64,), 7))
    assert torch.equal(out, expected.to(torch.int32))
