"""The device vocabulary (csrc/common/: mma.h, ldmatrix.h, cp_async.h, swizzle.h, vector_io.h,
warp_reduce.h) against independent models: the PTX ISA's fragment tables and ldmatrix distribution
written again here from the ISA's formulas, bank arithmetic, and torch. The kernels are
csrc/testing/vocabulary_kernels.cu: on CPU tensors they run under the SIMT emulator; the `cuda`
variants run the same kernels on the GPU and compare with the emulator (bit for bit where the
hardware is exact, to a tolerance for floating-point mma)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import llmkernels
from llmkernels._ext import C

import helpers

T = C.testing
EmulatorError = llmkernels.emulator.EmulatorError


def cap(x: torch.Tensor):
    return to_dlpack(x)


def stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


# -- the PTX ISA's fragment tables ("Matrix Fragments for mma.m16n8k16 / mma.m16n8k32"), from its formulas --

def ptx_coordinates(operand: str):
    """[(lane, i, row, col)] as the PTX ISA defines them (groupID = lane >> 2, threadID_in_group = lane % 4)."""
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        if operand == "a16":      # a0..a7
            for i in range(8):
                row = g if (i < 2 or 4 <= i < 6) else g + 8
                col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
                out.append((lane, i, row, col))
        elif operand == "b16":    # b0..b3, (row, col) = (k, n)
            for i in range(4):
                out.append((lane, i, t * 2 + (i & 1) + (8 if i >= 2 else 0), g))
        elif operand == "c":      # c0..c3 / d0..d3
            for i in range(4):
                out.append((lane, i, g if i < 2 else g + 8, t * 2 + (i & 1)))
        elif operand == "a_s8":   # a0..a15
            for i in range(16):
                row = g if (i < 4 or 8 <= i < 12) else g + 8
                col = t * 4 + (i & 3) + (16 if i >= 8 else 0)
                out.append((lane, i, row, col))
        elif operand == "b_s8":   # b0..b7
            for i in range(8):
                out.append((lane, i, t * 4 + (i & 3) + (16 if i >= 4 else 0), g))
    return out


MATRIX_SHAPES = {"a16": (16, 16), "b16": (16, 8), "c": (16, 8), "a_s8": (16, 32), "b_s8": (32, 8)}


@pytest.mark.parametrize("operand", sorted(MATRIX_SHAPES))
def test_fragment_coordinates_match_the_ptx_isa_table(operand):
    flat = T.mma_fragment_coordinates(operand)
    expected = ptx_coordinates(operand)
    actual = [(lane, i, flat[2 * k], flat[2 * k + 1]) for k, (lane, i, _, _) in enumerate(expected)]
    assert len(flat) == 2 * len(expected)
    assert actual == expected


@pytest.mark.parametrize("operand", sorted(MATRIX_SHAPES))
def test_fragment_coordinates_are_a_bijection_onto_the_matrix(operand):
    flat = T.mma_fragment_coordinates(operand)
    rows, cols = MATRIX_SHAPES[operand]
    cells = [(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)]
    assert len(cells) == rows * cols
    assert set(cells) == {(r, c) for r in range(rows) for c in range(cols)}


def test_fragment_coordinates_reject_unknown_operands():
    with pytest.raises(ValueError, match="operand"):
        T.mma_fragment_coordinates("d_s4")


# -- mma.sync ----------------------------------------------------------------------------------------

def run_mma(a, w, c, via_shared):
    d = helpers.poisoned((16, 8), dtype=c.dtype, device=a.device)
    T.vocab_mma(cap(a), cap(w), cap(c), cap(d), via_shared, stream(a))
    return d


def mma_inputs_16bit(dtype, seed):
    a = helpers.randn((16, 16), dtype=dtype, seed=seed)
    w = helpers.randn((8, 16), dtype=dtype, seed=seed + 1000)
    c = helpers.randn((16, 8), seed=seed + 2000)
    return a, w, c


def mma_inputs_s8(seed, wrap=False):
    g = helpers.generator(seed)
    a = torch.randint(-128, 128, (16, 32), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (8, 32), generator=g, dtype=torch.int8)
    c = torch.randint(-2**20, 2**20, (16, 8), generator=g, dtype=torch.int32)
    if wrap:  # sums past int32's range: s32 accumulation wraps modulo 2^32 (no .satfinite)
        c[::2] = 2**31 - 1 - c[::2].abs()
        c[1::2] = -2**31 + c[1::2].abs()
    return a, w, c


@pytest.mark.parametrize("via_shared", [False, True], ids=["direct", "via_shared"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mma_m16n8k16_matches_float64_matmul(dtype, via_shared, seed):
    a, w, c = mma_inputs_16bit(dtype, seed)
    d = run_mma(a, w, c, via_shared)
    exact = a.double() @ w.double().T + c.double()  # products of 16-bit floats are exact in float64
    magnitude = a.double().abs() @ w.double().abs().T + c.double().abs()
    error = (d.double() - exact).abs()
    assert torch.isfinite(d).all()
    assert (error <= 1e-5 * magnitude + 1e-30).all(), f"max relative error {(error / magnitude).max():.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_mma_m16n8k16_structured_inputs_locate_every_element(dtype):
    # Distinct powers of two per (row, k) and per (k, col): any misplaced element changes the exact sum.
    a = torch.zeros(16, 16, dtype=torch.float64)
    w = torch.zeros(8, 16, dtype=torch.float64)
    for k in range(16):
        a[:, k] = torch.tensor([2.0 ** ((r + k) % 7) * (1 + k % 3) for r in range(16)])
        w[:, k] = torch.tensor([2.0 ** (-(n * 3 + k) % 5) for n in range(8)])
    c = torch.arange(128, dtype=torch.float32).reshape(16, 8) / 64
    d = run_mma(a.to(dtype), w.to(dtype), c, via_shared=False)
    d_shared = run_mma(a.to(dtype), w.to(dtype), c, via_shared=True)
    exact = a @ w.T + c.double()
    assert torch.equal(d.double(), exact)          # every partial sum is exact here
    assert torch.equal(d_shared, d)


@pytest.mark.parametrize("via_shared", [False, True], ids=["direct", "via_shared"])
@pytest.mark.parametrize("seed,wrap", [(0, False), (1, False), (2, False), (3, True)])
def test_mma_m16n8k32_s8_is_exact(seed, wrap, via_shared):
    a, w, c = mma_inputs_s8(seed, wrap)
    d = run_mma(a, w, c, via_shared)
    exact = a.long() @ w.long().T + c.long()
    wrapped = ((exact + 2**31) % 2**32 - 2**31).to(torch.int32)
    if wrap:
        assert not torch.equal(exact, wrapped.long())  # the case does overflow
    assert torch.equal(d, wrapped)


# -- ldmatrix --------------------------------------------------------------------------------------------

def ldmatrix_model(rows: torch.Tensor, count: int, transposed: bool) -> torch.Tensor:
    """The PTX ISA's distribution: lane l's register j holds matrix j's (row l/4, cols 2(l%4), 2(l%4)+1),
    or with .trans (rows 2(l%4), 2(l%4)+1, col l/4); the lower-indexed element in the low 16 bits."""
    m = rows.to(torch.int64).reshape(count, 8, 8) & 0xFFFF
    out = torch.zeros(32, count, dtype=torch.int64)
    for lane in range(32):
        for j in range(count):
            if transposed:
                lo, hi = m[j, 2 * (lane % 4), lane // 4], m[j, 2 * (lane % 4) + 1, lane // 4]
            else:
                lo, hi = m[j, lane // 4, 2 * (lane % 4)], m[j, lane // 4, 2 * (lane % 4) + 1]
            out[lane, j] = lo | (hi << 16)
    return ((out + 2**31) % 2**32 - 2**31).to(torch.int32)


def ldmatrix_inputs(count, seed):
    g = helpers.generator(seed)
    rows = torch.randint(-2**15, 2**15, (8 * count, 8), generator=g, dtype=torch.int16)
    slots = torch.randperm(32, generator=g)[:8 * count].to(torch.int32)  # rows anywhere in shared memory
    return rows, slots


def run_ldmatrix(rows, slots, count, transposed):
    out = helpers.poisoned((32, count), dtype=torch.int32, device=rows.device)
    T.vocab_ldmatrix(cap(rows), cap(slots), cap(out), count, transposed, stream(rows))
    return out


@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_ldmatrix_distributes_like_the_ptx_isa(count, transposed, seed):
    rows, slots = ldmatrix_inputs(count, seed)
    assert torch.equal(run_ldmatrix(rows, slots, count, transposed), ldmatrix_model(rows, count, transposed))


# -- cp.async --------------------------------------------------------------------------------------------

def cp_async_inputs(threads, seed):
    g = helpers.generator(seed)
    source = torch.randint(0, 256, (threads, 32), generator=g, dtype=torch.uint8)
    sizes = torch.stack([torch.randint(0, size + 1, (threads,), generator=g) for size in (4, 8, 16)], 1)
    sizes[0] = torch.tensor([4, 8, 16])  # full copies,
    sizes[1] = 0                         # nothing read (all zeros),
    sizes[2] = torch.tensor([1, 7, 15])  # one byte short
    return source, sizes.to(torch.int32)


def cp_async_model(source, sizes):
    threads = source.shape[0]
    out = torch.full((threads, 48), 255, dtype=torch.uint8)  # bytes 4..7: never written
    for t in range(threads):
        for (begin, size), n in zip(((0, 4), (8, 8), (16, 16)), sizes[t].tolist()):
            out[t, begin:begin + size] = 0
            out[t, begin:begin + n] = source[t, begin:begin + n]
    out[:, 32:48] = out[torch.arange(threads) ^ 1, 16:32]
    return out


def run_cp_async(source, sizes, read_early=False):
    out = helpers.poisoned((source.shape[0], 48), dtype=torch.uint8, device=source.device)
    T.vocab_cp_async(cap(source), cap(sizes), cap(out), read_early, stream(source))
    return out


@pytest.mark.parametrize("schedule", ["ordered", "shuffled"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cp_async_zero_fill_and_wait_groups(seed, schedule):
    source, sizes = cp_async_inputs(64, seed)
    with llmkernels.emulator.emulate(schedule=schedule, seed=seed):
        out = run_cp_async(source, sizes)
    assert torch.equal(out, cp_async_model(source, sizes))


def test_cp_async_read_before_its_wait_is_reported():
    source, sizes = cp_async_inputs(64, 0)
    with pytest.raises(EmulatorError, match=r"cp\.async"):
        run_cp_async(source, sizes, read_early=True)


# -- swizzled tiles: bijection and banks ------------------------------------------------------------------

SWIZZLE_ROWS = 256


def swizzle_table(row_bytes, rows=SWIZZLE_ROWS):
    return torch.tensor(T.swizzled_offsets(row_bytes, rows)).reshape(rows, row_bytes)


@pytest.mark.parametrize("row_bytes", [16, 32, 64, 128, 256, 512])
def test_swizzled_tile_is_a_bijection_that_keeps_chunks_whole(row_bytes):
    offsets = swizzle_table(row_bytes)
    assert sorted(offsets.flatten().tolist()) == list(range(SWIZZLE_ROWS * row_bytes))
    rows = torch.arange(SWIZZLE_ROWS)[:, None]
    assert (offsets // row_bytes == rows).all()                     # a row stays in its row
    chunks = offsets.reshape(SWIZZLE_ROWS, row_bytes // 16, 16)
    assert (chunks - chunks[:, :, :1] == torch.arange(16)).all()    # 16-byte chunks move whole
    assert (chunks[:, :, 0] % 16 == 0).all()


@pytest.mark.parametrize("row_bytes", [16, 32, 64, 128, 256, 512])
def test_swizzled_tile_ldmatrix_phases_and_cp_async_quarter_warps_are_conflict_free(row_bytes):
    offsets = swizzle_table(row_bytes)
    chunks_per_row = row_bytes // 16
    bank_group = offsets[:, ::16] // 16 % 8   # (row, logical chunk) -> 16-byte bank group (128 B / wavefront)
    for first_row in range(SWIZZLE_ROWS - 7):  # ldmatrix phase: 8 consecutive rows, one logical chunk
        for chunk in range(chunks_per_row):
            assert len(set(bank_group[first_row:first_row + 8, chunk].tolist())) == 8, (first_row, chunk)
    flat = bank_group.flatten()               # row-major chunk order
    for first in range(0, flat.numel(), 8):   # cp.async quarter-warp: 8 consecutive chunks
        assert len(set(flat[first:first + 8].tolist())) == 8, first


def test_swizzled_offsets_reject_bad_rows():
    with pytest.raises(ValueError, match="row_bytes"):
        T.swizzled_offsets(48, 8)


# -- ldmatrix from a shared tile, swizzled or not: registers and bank conflicts ---------------------------

def tile_offset(row, byte, row_bytes, swizzled):
    if not swizzled:
        return row * row_bytes + byte
    chunks = row_bytes // 16
    return row * row_bytes + ((byte // 16) ^ ((row // (8 // chunks)) % chunks)) * 16 + byte % 16


def wavefronts(addresses):
    """(cost, ideal) of one warp-wide access of 16 bytes per lane: phases of 8 lanes (128 bytes); a
    phase costs the largest number of distinct 4-byte words any of the 32 banks serves."""
    cost = 0
    for phase in range(0, 32, 8):
        words = {}
        for address in addresses[phase:phase + 8]:
            for word in range(address // 4, address // 4 + 4):
                words.setdefault(word % 32, set()).add(word)
        cost += max(len(w) for w in words.values())
    return cost, 4


def tile_kernel_model(tile: torch.Tensor, swizzled: bool):
    """The kernel's registers (from the logical tile) and its extra wavefronts (bank conflicts)."""
    rows, row_bytes = tile.shape
    chunks = row_bytes // 16
    extra = 0
    for first in range(0, rows * chunks, 32):  # cp.async: lane l copies chunk first + l
        cost, ideal = wavefronts([tile_offset(q // chunks, 16 * (q % chunks), row_bytes, swizzled)
                                  for q in range(first, first + 32)])
        extra += cost - ideal
    halves = tile.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF  # uint16 elements (little-endian)
    halves = halves.reshape(rows, row_bytes // 2)
    registers = []
    for row_block in range(rows // 8):
        for first_chunk in range(0, chunks, 4):
            addresses = [tile_offset(8 * row_block + l % 8, 16 * (first_chunk + l // 8), row_bytes, swizzled)
                         for l in range(32)]
            cost, ideal = wavefronts(addresses)
            extra += cost - ideal
            call = torch.zeros(32, 4, dtype=torch.int64)
            for lane in range(32):
                for j in range(4):
                    row, col = 8 * row_block + lane // 4, 8 * (first_chunk + j) + 2 * (lane % 4)
                    call[lane, j] = halves[row, col] | (halves[row, col + 1] << 16)
            registers.append(call)
    registers = ((torch.stack(registers) + 2**31) % 2**32 - 2**31).to(torch.int32)
    return registers, extra


def run_ldmatrix_tile(tile, swizzled):
    rows, row_bytes = tile.shape
    out = helpers.poisoned((rows // 8 * (row_bytes // 64), 32, 4), dtype=torch.int32, device=tile.device)
    T.vocab_ldmatrix_tile(cap(tile), cap(out), swizzled, stream(tile))
    return out


def tile_input(rows, row_bytes, seed=0):
    return torch.randint(0, 256, (rows, row_bytes), generator=helpers.generator(seed), dtype=torch.uint8)


@pytest.mark.parametrize("swizzled", [True, False], ids=["swizzled", "plain"])
@pytest.mark.parametrize("rows,row_bytes", [(16, 64), (32, 64), (16, 128)])
def test_ldmatrix_tile_registers_and_bank_conflicts(rows, row_bytes, swizzled):
    tile = tile_input(rows, row_bytes)
    expected, expected_extra = tile_kernel_model(tile, swizzled)
    if swizzled:
        assert expected_extra == 0
    else:  # 8 rows of one chunk: 64-byte rows hit 2 bank groups (4-way), 128-byte rows one (8-way)
        assert expected_extra == (3 if row_bytes == 64 else 7) * 4 * expected.shape[0]
    llmkernels.emulator.reset_report()
    out = run_ldmatrix_tile(tile, swizzled)
    assert torch.equal(out, expected)
    name = "vocabulary ldmatrix swizzled tile" if swizzled else "vocabulary ldmatrix plain tile"
    [entry] = [r for r in llmkernels.emulator.report() if r["kernel"] == name]
    assert entry["shared_wavefronts"] - entry["shared_ideal_wavefronts"] == expected_extra
    assert sum(entry["bank_conflicts_by_site"].values()) == expected_extra
    if swizzled:
        assert entry["bank_conflicts_by_site"] == {} or set(entry["bank_conflicts_by_site"].values()) == {0}


# -- warp reductions -------------------------------------------------------------------------------------

def butterfly(x: torch.Tensor, op) -> torch.Tensor:
    """__shfl_xor_sync with offsets 16, 8, 4, 2, 1 in x's own dtype: the bits the warp computes."""
    v = x.reshape(-1, 32).clone()
    lanes = torch.arange(32)
    for offset in (16, 8, 4, 2, 1):
        v = op(v, v[:, lanes ^ offset])
    return v.reshape(x.shape)


def run_warp_reduce(x):
    s, m = helpers.poisoned(x.shape, dtype=x.dtype, device=x.device), helpers.poisoned(x.shape, dtype=x.dtype, device=x.device)
    T.vocab_warp_reduce(cap(x), cap(s), cap(m), stream(x))
    return s, m


def warp_inputs(n, dtype, seed):
    if dtype == torch.int32:
        return torch.randint(-2**20, 2**20, (n,), generator=helpers.generator(seed), dtype=torch.int32)
    return helpers.randn((n,), seed=seed)


@pytest.mark.parametrize("n", [32, 256, 96])  # 256: four-warp blocks; 96: one-warp blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32], ids=["f32", "i32"])
def test_warp_sum_and_max_match_torch(dtype, n):
    x = warp_inputs(n, dtype, seed=n)
    s, m = run_warp_reduce(x)
    warps = x.reshape(-1, 32)
    assert torch.equal(m, warps.max(1, keepdim=True).values.expand(-1, 32).reshape(-1))
    if dtype == torch.int32:
        assert torch.equal(s, warps.long().sum(1, keepdim=True).expand(-1, 32).reshape(-1).to(torch.int32))
    else:
        assert torch.equal(s, butterfly(x, torch.add))
        exact = warps.double().sum(1, keepdim=True).expand(-1, 32).reshape(-1)
        assert (s.double() - exact).abs().max() <= 1e-5 * warps.double().abs().sum(1).max()


# -- vector loads and stores -----------------------------------------------------------------------------

VECTOR_CASES = [(1, False), (2, False), (4, False), (8, False), (16, False), (4, True), (8, True), (16, True)]


def run_vector_copy(source, vector_bytes, once):
    out = helpers.poisoned(source.shape, dtype=torch.uint8, device=source.device)
    T.vocab_vector_copy(cap(source), cap(out), vector_bytes, once, stream(source))
    return out


@pytest.mark.parametrize("vector_bytes,once", VECTOR_CASES, ids=[f"{b}B{'_once' if o else ''}" for b, o in VECTOR_CASES])
def test_vector_loads_and_stores_move_whole_vectors(vector_bytes, once):
    blocks = 3
    source = torch.randint(0, 256, (blocks * 64 * vector_bytes,), generator=helpers.generator(vector_bytes), dtype=torch.uint8)
    out = run_vector_copy(source, vector_bytes, once)
    expected = source.reshape(blocks, 64, vector_bytes).flip(1).reshape(-1)
    assert torch.equal(out, expected)


def test_vector_copy_rejects_unsupported_sizes():
    source = torch.zeros(64 * 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="load_global_once"):
        T.vocab_vector_copy(cap(source), cap(torch.zeros_like(source)), 2, True, 0)


# -- the same kernels on the GPU, against the emulator -----------------------------------------------------

def on_cuda(run, *inputs, **kwargs):
    result = run(*[x.cuda() for x in inputs], **kwargs)
    torch.cuda.synchronize()
    return result.cpu() if isinstance(result, torch.Tensor) else tuple(r.cpu() for r in result)


@pytest.mark.cuda
@pytest.mark.parametrize("via_shared", [False, True], ids=["direct", "via_shared"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_cuda_mma_m16n8k16_matches_the_emulator(dtype, via_shared):
    for seed in range(4):
        a, w, c = mma_inputs_16bit(dtype, seed)
        emulated = run_mma(a, w, c, via_shared)
        hardware = on_cuda(run_mma, a, w, c, via_shared=via_shared)
        magnitude = a.double().abs() @ w.double().abs().T + c.double().abs()
        assert ((hardware.double() - emulated.double()).abs() <= 1e-5 * magnitude + 1e-30).all()


@pytest.mark.cuda
@pytest.mark.parametrize("via_shared", [False, True], ids=["direct", "via_shared"])
def test_cuda_mma_m16n8k32_s8_equals_the_emulator(via_shared):
    for seed, wrap in [(0, False), (1, False), (2, True)]:
        a, w, c = mma_inputs_s8(seed, wrap)
        assert torch.equal(on_cuda(run_mma, a, w, c, via_shared=via_shared), run_mma(a, w, c, via_shared))


@pytest.mark.cuda
@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_cuda_ldmatrix_equals_the_emulator(count, transposed):
    rows, slots = ldmatrix_inputs(count, 5)
    assert torch.equal(on_cuda(run_ldmatrix, rows, slots, count=count, transposed=transposed),
                       run_ldmatrix(rows, slots, count, transposed))


@pytest.mark.cuda
def test_cuda_cp_async_equals_the_emulator():
    source, sizes = cp_async_inputs(64, 3)
    assert torch.equal(on_cuda(run_cp_async, source, sizes), run_cp_async(source, sizes))


@pytest.mark.cuda
@pytest.mark.parametrize("swizzled", [True, False], ids=["swizzled", "plain"])
def test_cuda_ldmatrix_tile_equals_the_emulator(swizzled):
    tile = tile_input(32, 128, seed=4)
    assert torch.equal(on_cuda(run_ldmatrix_tile, tile, swizzled=swizzled), run_ldmatrix_tile(tile, swizzled))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32], ids=["f32", "i32"])
def test_cuda_warp_reduce_equals_the_emulator(dtype):
    x = warp_inputs(256, dtype, seed=9)
    for hardware, emulated in zip(on_cuda(run_warp_reduce, x), run_warp_reduce(x)):
        assert torch.equal(hardware, emulated)


@pytest.mark.cuda
@pytest.mark.parametrize("vector_bytes,once", VECTOR_CASES, ids=[f"{b}B{'_once' if o else ''}" for b, o in VECTOR_CASES])
def test_cuda_vector_copy_equals_the_emulator(vector_bytes, once):
    source = torch.randint(0, 256, (2 * 64 * vector_bytes,), generator=helpers.generator(1), dtype=torch.uint8)
    assert torch.equal(on_cuda(run_vector_copy, source, vector_bytes=vector_bytes, once=once),
                       run_vector_copy(source, vector_bytes, once))
