"""The GEMM core (llmkernels._gemm, csrc/gemm/): parity with a float64 oracle on odd shapes, every
epilogue, gathered rows, accumulation; torch.compile and opcheck; every error message.

Oracle: llmkernels.reference.gemm in float64 (out_dtype=torch.float64), itself checked against
torch.matmul in float64. Parity rule (helpers.assert_parity): the kernel's error is at most 2x the
error of the same computation done by PyTorch in the same precision (matmul, then each epilogue step
in the output dtype), plus a floor. Outputs are NaN-poisoned, so an element the kernel forgets fails.
Emulated cases ("emu") keep M, N, K <= ~160: the emulator runs a block in milliseconds.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import llmkernels
from llmkernels import _gemm
from llmkernels.reference import gemm as reference
from llmkernels._ext import C

from helpers import assert_parity, poisoned, randn

ACTIVATIONS = ("none", "silu", "gelu", "swiglu")
# M odd, N and K multiples of 8 that are not multiples of 16, 32 or 64 (except where noted).
SHAPES = [(1, 8, 8), (3, 24, 136), (17, 40, 72), (65, 72, 40), (130, 136, 24), (1, 136, 136), (130, 8, 8),
          (17, 136, 40)]


def emulating() -> bool:
    return C.emulator.settings()[0]


def input_dtypes(device: torch.device):
    """bf16 and fp16 everywhere; fp32 on the CPU kernel (not on CUDA, not emulated)."""
    if device.type == "cpu" and not emulating():
        return [torch.bfloat16, torch.float16, torch.float32]
    return [torch.bfloat16, torch.float16]


def make(m, n, k, dtype, device, *, seed=0, t=None, bias=False, row_scale=False, col_scale=False, rows=False):
    """x (m or t rows, k), weight (n, k) and the optional vectors, seeded; rows gathered with repeats.
    weight ~ N(0, 1/k), as a layer is initialized: products of magnitude ~1 whatever k, so that the
    parity floor means the same at every k."""
    x = randn((t or m, k), dtype=dtype, device=device, seed=seed)
    w = randn((n, k), dtype=dtype, device=device, seed=seed + 1, scale=k ** -0.5)
    extras = {}
    if bias:
        extras["bias"] = randn((n,), device=device, seed=seed + 2)
    if row_scale:
        extras["row_scale"] = randn((m,), device=device, seed=seed + 3, scale=0.5) + 1.0
    if col_scale:
        extras["col_scale"] = randn((n,), device=device, seed=seed + 4, scale=0.5) + 1.0
    if rows:
        index = torch.randint(0, t, (m,), generator=torch.Generator().manual_seed(seed + 5), dtype=torch.int32)
        if m >= 3:
            index[1] = index[0]   # at least one repeat
        extras["rows"] = index.to(device)
    return x, w, extras


def torch_same_precision(x, w, *, bias=None, row_scale=None, col_scale=None, activation="none", rows=None,
                         out_dtype=None, old=None):
    """The computation in torch in the output's precision: the product rounded to it, then each
    epilogue step rounded to it. bf16/fp16 output: torch.matmul in that dtype. fp32 output: the
    plain fp32 loop, one rank-1 update per k (products rounded, then added). Not torch.matmul in
    fp32: the output's rounding is then no longer the dominant error, and a BLAS's fused, blocked
    dot is no more "the same computation" than any other summation order (measured: a tiled fp32
    accumulation is up to 3x off it on a few hundred elements, either way round by luck)."""
    dtype = out_dtype or x.dtype
    a = x[rows.long()] if rows is not None else x.reshape(-1, w.shape[1])
    if dtype == torch.float32:
        a, w32 = a.float(), w.float()
        v = torch.zeros(a.shape[0], w.shape[0], device=a.device)
        for kk in range(w.shape[1]):
            v = v + a[:, kk, None] * w32[None, :, kk]
    else:
        v = torch.matmul(a.to(dtype), w.to(dtype).T)
    if row_scale is not None:
        v = v * row_scale.to(dtype)[:, None]
    if col_scale is not None:
        v = v * col_scale.to(dtype)
    if bias is not None:
        v = v + bias.to(dtype)
    if activation == "silu":
        v = torch.nn.functional.silu(v)
    elif activation == "gelu":
        v = torch.nn.functional.gelu(v)
    elif activation == "swiglu":
        v = torch.nn.functional.silu(v[:, 0::2]) * v[:, 1::2]
    return v if old is None else old + v


def run_core(x, w, *, bias=None, row_scale=None, col_scale=None, activation="none", rows=None, out_dtype=None,
             old=None):
    """The op itself into a NaN-poisoned output (or into a copy of `old`, accumulating)."""
    n, k = w.shape
    m = rows.shape[0] if rows is not None else x.reshape(-1, k).shape[0]
    columns = n // 2 if activation == "swiglu" else n
    if old is None:
        out = poisoned((m, columns), dtype=out_dtype or x.dtype, device=x.device)
    else:
        out = old.clone()
    a = x if rows is not None else x.reshape(-1, k)
    _gemm._gemm(a, rows, w, bias, row_scale, col_scale, _gemm.ACTIVATIONS[activation], old is not None, out,
                _gemm.workspace(m, n, k, x.device))
    return out


def check(x, w, name, *, old=None, **kwargs):
    actual = run_core(x, w, old=old, **kwargs)
    oracle = reference.gemm(x.cpu(), w.cpu(), **{key: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                                   for key, v in kwargs.items() if key != "out_dtype"},
                            out_dtype=torch.float64)
    if old is not None:
        oracle = oracle + old.double().cpu()
    assert_parity(actual, torch_same_precision(x, w, old=old, **kwargs), oracle, name)
    return actual


# ---------------------------------------------------------------------------------------------
# The oracle itself


def test_reference_is_matmul_in_float64():
    x, w, _ = make(17, 40, 72, torch.bfloat16, "cpu")
    expected = x.double() @ w.double().T
    assert torch.equal(reference.gemm(x, w, out_dtype=torch.float64), expected)
    assert torch.equal(reference.gemm(x, w), expected.to(torch.bfloat16))   # one rounding at the end
    gate, up = expected[:, 0::2], expected[:, 1::2]
    torch.testing.assert_close(reference.gemm(x, w, activation="swiglu", out_dtype=torch.float64),
                               gate * torch.sigmoid(gate) * up, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_plain_matches_matmul(device, m, n, k):
    for dtype in input_dtypes(device):
        x, w, _ = make(m, n, k, dtype, device, seed=m + n + k)
        actual = check(x, w, f"{dtype} {m}x{n}x{k}")
        # and directly against torch.matmul in float64, independent of the reference module
        assert_parity(actual, torch.matmul(x, w.T), x.double().cpu() @ w.double().cpu().T, f"{dtype} vs matmul")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("m,n,k", [(3, 24, 40), (65, 136, 72)])
def test_epilogue(device, activation, m, n, k):
    for dtype in input_dtypes(device):
        x, w, extras = make(m, n, k, dtype, device, seed=7, bias=True, row_scale=True, col_scale=True)
        check(x, w, f"{dtype} {activation} full epilogue", activation=activation, **extras)
        check(x, w, f"{dtype} {activation} alone", activation=activation)


@pytest.mark.parametrize("which", ["bias", "row_scale", "col_scale"])
def test_each_epilogue_term(device, which):
    for dtype in input_dtypes(device):
        x, w, extras = make(17, 72, 40, dtype, device, seed=11, **{which: True})
        actual = check(x, w, f"{dtype} {which}", **extras)
        plain = run_core(x, w)
        assert not torch.equal(actual, plain), f"{which} had no effect"


@pytest.mark.parametrize("m,n,k", [(1, 8, 8), (17, 40, 72), (130, 136, 24)])
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_accumulate_adds_into_the_old_contents(device, m, n, k, activation):
    for dtype in input_dtypes(device):
        for out_dtype in dict.fromkeys([dtype, torch.float32]):
            x, w, extras = make(m, n, k, dtype, device, seed=3, bias=True)
            columns = n // 2 if activation == "swiglu" else n
            old = randn((m, columns), dtype=out_dtype, device=device, seed=99, scale=4.0)
            actual = check(x, w, f"{dtype}->{out_dtype} accumulate {activation}", old=old, activation=activation,
                           out_dtype=out_dtype, **extras)
            fresh = run_core(x, w, activation=activation, out_dtype=out_dtype, **extras)
            # the old contents were added: out - old is the fresh product (to the output's rounding)
            assert_parity(actual - old, fresh, (actual - old).double(), "accumulate minus old")
            assert (actual - fresh).abs().max() > 1.0, "accumulate ignored the old contents"


@pytest.mark.parametrize("m,t", [(1, 1), (3, 2), (17, 5), (65, 130), (130, 17)])
def test_gathered_rows_with_repeats(device, m, t):
    for dtype in input_dtypes(device):
        x, w, extras = make(m, 40, 72, dtype, device, seed=m, t=t, rows=True, row_scale=True, bias=True)
        actual = check(x, w, f"{dtype} gathered {m} of {t}", activation="silu", **extras)
        rows = extras.pop("rows").long()
        # the same as gathering first
        assert torch.equal(actual, run_core(x[rows].contiguous(), w, activation="silu", **extras))


@pytest.mark.parametrize("m,n,k", [(3, 24, 136), (65, 72, 40)])
def test_float32_output(device, m, n, k):
    for dtype in input_dtypes(device):
        x, w, extras = make(m, n, k, dtype, device, seed=5, bias=True, col_scale=True)
        for activation in ("none", "gelu"):
            actual = check(x, w, f"{dtype}->fp32 {activation}", activation=activation, out_dtype=torch.float32,
                           **extras)
            assert actual.dtype == torch.float32


def test_strided_rows_of_a(device):
    """A's row stride may exceed K (a multiple of 8): a column slice of a wider tensor."""
    for dtype in input_dtypes(device):
        wide = randn((17, 72 + 24), dtype=dtype, device=device, seed=2)
        x = wide[:, :72]
        w = randn((40, 72), dtype=dtype, device=device, seed=4)
        assert x.stride(0) == 96
        actual = check(x, w, f"{dtype} lda 96")
        assert torch.equal(actual, run_core(x.contiguous(), w))


def test_public_function_shapes_and_accumulate(device):
    dtype = input_dtypes(device)[0]
    x = randn((2, 3, 40), dtype=dtype, device=device, seed=1)
    w = randn((24, 40), dtype=dtype, device=device, seed=2)
    bias = randn((24,), device=device, seed=3)
    y = _gemm.gemm(x, w, bias=bias, activation="swiglu")
    assert y.shape == (2, 3, 12) and y.dtype == dtype
    assert torch.equal(y.reshape(6, 12), run_core(x.reshape(6, 40), w, bias=bias, activation="swiglu"))
    assert _gemm.gemm(x[0, 0], w).shape == (24,)
    into = randn((2, 3, 24), dtype=torch.float32, device=device, seed=4)
    expected = into.reshape(6, 24) + run_core(x.reshape(6, 40), w, out_dtype=torch.float32)
    result = _gemm.gemm(x, w, accumulate_into=into)
    assert result is into
    assert_parity(into.reshape(6, 24), expected, into.reshape(6, 24).double(), "accumulate_into")
    rows = torch.tensor([5, 0, 5], dtype=torch.int32, device=device)
    gathered = _gemm.gemm(x.reshape(6, 40), w, rows=rows, out_dtype=torch.float32)
    assert gathered.shape == (3, 24) and gathered.dtype == torch.float32
    empty = _gemm.gemm(x[:0], w)
    assert empty.shape == (0, 3, 24)


def test_touches_nothing_outside_out(device):
    dtype = input_dtypes(device)[0]
    x, w, extras = make(17, 40, 24, dtype, device, bias=True)
    storage = poisoned((17 * 40 + 64,), dtype=dtype, device=device)
    out = storage[8:8 + 17 * 40].view(17, 40)   # 16-byte aligned inside a larger buffer
    _gemm._gemm(x, None, w, extras["bias"], None, None, 0, False, out, _gemm.workspace(17, 40, 24, device))
    assert torch.isnan(storage[:8]).all() and torch.isnan(storage[8 + 17 * 40:]).all()
    assert torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("m,n,k", [(257, 520, 1032), (1, 4096, 1032)])
def test_larger_shapes(device, m, n, k):
    for dtype in input_dtypes(device)[:2]:
        x, w, extras = make(m, n, k, dtype, device, seed=9, bias=True, col_scale=True)
        check(x, w, f"{dtype} {m}x{n}x{k}", activation="gelu", **extras)


# ---------------------------------------------------------------------------------------------
# torch.compile and opcheck


def test_opcheck_gemm(device):
    x, w, extras = make(5, 24, 40, torch.bfloat16, device, t=7, bias=True, row_scale=True, col_scale=True, rows=True)
    out = poisoned((5, 12), dtype=torch.float32, device=device)
    args = (x, extras["rows"], w, extras["bias"], extras["row_scale"], extras["col_scale"], 3, False, out,
            _gemm.workspace(5, 24, 40, device))
    torch.library.opcheck(torch.ops.llmkernels.gemm.default, args)
    out = randn((5, 24), dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.llmkernels.gemm.default,
                          (x[:5], None, w, None, None, None, 2, True, out, _gemm.workspace(5, 24, 40, device)))
    # a split-K problem (small M, long K): the workspace is used on CUDA and under the emulator
    x, w, _ = make(5, 24, 1032, torch.bfloat16, device)
    assert C.gemm_workspace(5, 24, 1032) > 0
    scratch = torch.zeros(_gemm.workspace_elements(5, 24, 1032), device=device)
    out = poisoned((5, 24), dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.llmkernels.gemm.default, (x, None, w, None, None, None, 0, False, out, scratch))


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    x, w, extras = make(17, 40, 24, torch.bfloat16, device, bias=True)
    into = randn((17, 20), dtype=torch.float32, device=device, seed=8)
    expected_into = into.clone()

    def step(x, w, bias, into):
        y = _gemm.gemm(x, w, bias=bias, activation="gelu")
        _gemm.gemm(x, w, bias=bias, activation="swiglu", accumulate_into=into)
        return y * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, extras["bias"], into)
    expected = step(x, w, extras["bias"], expected_into)
    assert torch.equal(got, expected)
    assert torch.equal(into, expected_into)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x must have dtype bfloat16, float16, float32; got int64"):
        _gemm.gemm(torch.zeros(4, 16, dtype=torch.int64), w)
    with pytest.raises(TypeError, match="weight must have x's dtype bfloat16; got float16"):
        _gemm.gemm(x, w.half())
    with pytest.raises(ValueError, match=r"weight must have shape \(N, K\); got \(16,\)"):
        _gemm.gemm(x, w[0])
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., K\) with K = 16 \(weight's columns\); got \(4, 8\)"):
        _gemm.gemm(x[:, :8], w)
    with pytest.raises(ValueError, match=r"K must be a positive multiple of 8 \(got 13\)"):
        _gemm.gemm(torch.randn(4, 13, dtype=torch.bfloat16), torch.randn(8, 13, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"N must be a positive multiple of 8 \(got 12\)"):
        _gemm.gemm(x, torch.randn(12, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="activation must be one of 'none', 'silu', 'gelu', 'swiglu'; got 'relu'"):
        _gemm.gemm(x, w, activation="relu")
    with pytest.raises(TypeError, match="rows must have dtype int32; got int64"):
        _gemm.gemm(x, w, rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"rows must have shape \(M,\); got \(1, 2\)"):
        _gemm.gemm(x, w, rows=torch.tensor([[0, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"with rows, x must have shape \(T, K\); got \(1, 4, 16\)"):
        _gemm.gemm(x[None], w, rows=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\) \(N\); got \(4,\)"):
        _gemm.gemm(x, w, bias=torch.zeros(4))
    with pytest.raises(TypeError, match="bias must have dtype float32; got bfloat16"):
        _gemm.gemm(x, w, bias=torch.zeros(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"row_scale must have shape \(4,\) \(M, the rows of A\); got \(8,\)"):
        _gemm.gemm(x, w, row_scale=torch.ones(8))
    with pytest.raises(ValueError, match=r"col_scale must have shape \(8,\) \(N\); got \(4,\)"):
        _gemm.gemm(x, w, col_scale=torch.ones(4))
    with pytest.raises(TypeError, match="out_dtype must be x's dtype bfloat16 or float32; got torch.float16"):
        _gemm.gemm(x, w, out_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"accumulate_into must have shape \(4, 4\); got \(4, 8\)"):
        _gemm.gemm(x, w, activation="swiglu", accumulate_into=torch.zeros(4, 8))
    with pytest.raises(TypeError, match="accumulate_into must have dtype bfloat16, float32; got float16"):
        _gemm.gemm(x, w, accumulate_into=torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="accumulate_into has dtype float32 but out_dtype is torch.bfloat16"):
        _gemm.gemm(x, w, accumulate_into=torch.zeros(4, 8), out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="accumulate_into must be contiguous"):
        _gemm.gemm(x[None], w, accumulate_into=torch.zeros(1, 8, 4).transpose(1, 2))


def capsules(*tensors):
    return [None if t is None else to_dlpack(t) for t in tensors]


def native(a, rows, b, out, *, bias=None, row_scale=None, col_scale=None, activation=0, accumulate=False,
           workspace=None):
    m = rows.shape[0] if rows is not None else a.shape[0]
    if workspace is None:
        workspace = _gemm.workspace(m, b.shape[0], b.shape[1], a.device)
    C.gemm(*capsules(a, rows, b, bias, row_scale, col_scale), activation, accumulate, to_dlpack(out),
           to_dlpack(workspace), False, 0)


def test_native_core_checks_its_own_inputs():
    a = torch.randn(4, 16, dtype=torch.bfloat16)
    b = torch.randn(8, 16, dtype=torch.bfloat16)
    out = torch.full((4, 8), 7.0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"k must be a positive multiple of 8 \(got 13\)"):
        native(torch.randn(4, 13, dtype=torch.bfloat16), None, torch.randn(8, 13, dtype=torch.bfloat16), out)
    with pytest.raises(ValueError, match=r"n must be a positive multiple of 8 \(got 12\)"):
        native(a, None, torch.randn(12, 16, dtype=torch.bfloat16), torch.zeros(4, 12, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"b must have shape \(n, k\) with k = 16 \(a's columns\); got \(8, 24\)"):
        native(a, None, torch.randn(8, 24, dtype=torch.bfloat16), out)
    with pytest.raises(ValueError, match="a must have unit stride along k"):
        native(torch.randn(16, 4, dtype=torch.bfloat16).T, None, b, out)
    with pytest.raises(ValueError, match=r"a's row stride must be >= k and a multiple of 8 elements .*got 20"):
        native(torch.randn(4, 20, dtype=torch.bfloat16)[:, :16], None, b, out)
    with pytest.raises(ValueError, match="b must be contiguous"):
        native(a, None, torch.randn(8, 32, dtype=torch.bfloat16)[:, :16], out)
    with pytest.raises(ValueError, match="out must be contiguous"):
        native(a, None, b, torch.zeros(4, 16, dtype=torch.bfloat16)[:, :8])
    with pytest.raises(ValueError, match=r"out must have shape \(4, 4\) \(m, n / 2 for swiglu\); got \(4, 8\)"):
        native(a, None, b, out, activation=3)
    with pytest.raises(TypeError, match="b is float16 but a is bfloat16; they must have the same dtype"):
        native(a, None, b.half(), out)
    with pytest.raises(TypeError, match=r"out must be bfloat16 \(a's dtype\) or float32; got float16"):
        native(a, None, b, out.half())
    with pytest.raises(TypeError, match="a must be bfloat16 or float16, or float32 .*; got int32"):
        native(a.int(), None, b.int(), out)
    with pytest.raises(TypeError, match="bias must be float32; got float64"):
        native(a, None, b, out, bias=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"row_scale must have shape \(4,\); got \(8,\)"):
        native(a, None, b, out, row_scale=torch.ones(8))
    with pytest.raises(ValueError, match=r"activation must be 0 \(none\), 1 \(silu\), 2 \(gelu\) or 3 \(swiglu\); got 7"):
        native(a, None, b, out, activation=7)
    with pytest.raises(TypeError, match="a_rows must be int32; got int64"):
        native(a, torch.tensor([0, 1, 2, 3]), b, out)
    with pytest.raises(ValueError, match=r"a_rows\[2\] must be a row of a in \[0, 4\); got 9"):
        native(a, torch.tensor([0, 1, 9, 3], dtype=torch.int32), b, out)
    with pytest.raises(ValueError, match=r"a_rows\[0\] must be a row of a in \[0, 4\); got -1"):
        native(a, torch.tensor([-1, 1, 2, 3], dtype=torch.int32), b, out)
    misaligned = torch.randn(4 * 16 + 1, dtype=torch.bfloat16)[1:].view(4, 16)
    with pytest.raises(ValueError, match=r"a's data pointer must be 16-byte aligned .*\(2 bytes past"):
        native(misaligned, None, b, out)
    with pytest.raises(ValueError, match="b's data pointer must be 16-byte aligned"):
        native(a, None, torch.randn(8 * 16 + 1, dtype=torch.bfloat16)[1:].view(8, 16), out)
    with pytest.raises(ValueError, match="out's data pointer must be 16-byte aligned"):
        native(a, None, b, torch.zeros(4 * 8 + 4, dtype=torch.bfloat16)[4:].view(4, 8))
    shared = torch.randn(4 * 16 + 4 * 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="a overlaps out in memory; it is read while out is written"):
        native(shared[:64].view(4, 16), None, b, shared[56:88].view(4, 8))
    with pytest.raises(ValueError, match="bias overlaps out in memory"):
        out32 = torch.zeros(4, 8)
        native(a, None, b, out32, bias=out32[0])
    assert (out == 7).all()   # every check runs before the kernel: nothing was written


def test_float32_is_refused_under_the_emulator():
    a = randn((4, 16), seed=31)
    b = randn((8, 16), seed=32)
    out = torch.zeros(4, 8)
    with llmkernels.emulator.emulate():
        with pytest.raises(TypeError, match=r"a must be bfloat16 or float16 \(float32 runs on the CPU kernel only"):
            native(a, None, b, out)
    native(a, None, b, out)   # the CPU kernel takes it
    assert_parity(out, a @ b.T, a.double() @ b.double().T, "fp32 CPU")


@pytest.mark.cuda
def test_float32_and_mixed_devices_are_refused_on_cuda():
    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(TypeError, match=r"x must be bfloat16 or float16 on cuda:0 \(float32 runs on the CPU kernel only\)"):
        _gemm.gemm(x, torch.randn(8, 16, device="cuda"))
    xb = x.bfloat16()
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda:0"):
        _gemm.gemm(xb, torch.randn(8, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="b is on cpu but a is on cuda:0"):
        native(xb, None, torch.randn(8, 16, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(TypeError, match=r"a must be bfloat16 or float16 \(float32 runs on the CPU kernel only.*on CUDA"):
        native(x, None, torch.randn(8, 16, device="cuda"), torch.zeros(4, 8, device="cuda"))


# -- the CUDA kernel's source under the emulator: every tiling, no bank conflicts, any schedule ----

# One shape per tiling of gemm_cuda.cu: small (M <= 16), medium, large (>= 132 tiles of 128 x 128),
# each with more k tiles than its ring has stages (and a partial last one), so the prefetch wraps
# onto used buffers: small 8 tiles of 64 for 6 stages, medium and large 6 tiles of 32 for 4.
TILINGS = {"small": (16, 72, 7 * 64 + 8), "medium": (130, 136, 5 * 32 + 8), "large": (12 * 128, 11 * 128 + 8, 5 * 32 + 8)}


@pytest.mark.emu
@pytest.mark.parametrize("tiling", sorted(TILINGS))
def test_emulated_kernel_every_tiling_matches_oracle_without_bank_conflicts(tiling):
    m, n, k = TILINGS[tiling]
    x, w, extras = make(m, n, k, torch.bfloat16, "cpu", seed=7, bias=True)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate():
        out = _gemm.gemm(x, w, **extras, out_dtype=torch.float32)
    oracle = reference.gemm(x, w, **extras, out_dtype=torch.float64)
    torch_fp32 = (x.float() @ w.float().T) + extras["bias"]
    assert_parity(out, torch_fp32, oracle, f"emulated gemm, {tiling} tiling")
    (report,) = [r for r in llmkernels.emulator.report() if r["kernel"] == "gemm"]
    assert report["launches"] == 1 and report["shared_accesses"] > 0
    assert report["bank_conflicts_by_site"] == {}, report
    assert report["shared_wavefronts"] == report["shared_ideal_wavefronts"]


@pytest.mark.emu
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_emulated_kernel_gives_the_same_bits_under_shuffled_schedules(seed):
    """A kernel whose result depended on the order its threads run in (a race the shadow missed)
    would differ between schedules."""
    x, w, extras = make(130, 136, 168, torch.float16, "cpu", seed=seed, bias=True, row_scale=True, rows=True, t=40)
    with llmkernels.emulator.emulate():
        ordered = _gemm.gemm(x, w, **extras, activation="swiglu")
    with llmkernels.emulator.emulate(schedule="shuffled", seed=seed):
        shuffled = _gemm.gemm(x, w, **extras, activation="swiglu")
    assert torch.equal(ordered, shuffled)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_split_k_small_m_long_k(device, activation, accumulate):
    """M <= 16 with few column tiles: the CUDA kernel splits K into ranges of whole k tiles and adds
    the partial sums in a second kernel, which runs the epilogue (gemm.h: split_k). K has a partial
    last tile, and one range is shorter than the others."""
    m, n, k = 5, 40, 17 * 64 - 56
    assert C.gemm_workspace(m, n, k) == 4 * m * n   # 17 k tiles of 64 (the last partial): 5, 5, 5, 2
    x, w, extras = make(m, n, k, torch.bfloat16, device, seed=11, bias=True, row_scale=True, rows=True, t=9)
    old = randn((m, n // 2 if activation == "swiglu" else n), device=device, seed=12) if accumulate else None
    llmkernels.emulator.reset_report()
    check(x, w, f"split-K {activation}", old=old, activation=activation, **extras)
    if emulating():
        kernels = {r["kernel"]: r["launches"] for r in llmkernels.emulator.report()}
        assert kernels == {"gemm": 1, "gemm split-k reduce": 1}, kernels


def test_workspace_bound_covers_what_the_kernel_needs():
    """The Python layer allocates a bound it can compute while tracing; the kernel's exact need
    (gemm.h: split_k) never exceeds it, and a workspace smaller than the need is refused."""
    for m in (1, 2, 5, 16, 17, 64):
        for n in (8, 40, 1024, 4096, 14336):
            for k in (8, 256, 1032, 4096, 14336):
                assert C.gemm_workspace(m, n, k) <= _gemm.workspace_elements(m, n, k), (m, n, k)
    x, w, _ = make(5, 24, 1032, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match=r"workspace must have at least 480 elements \(split_k_workspace\(m, n, k\)\); got 479"):
        native(x, None, w, torch.empty(5, 24, dtype=torch.bfloat16), workspace=torch.empty(479))


@pytest.mark.slow
def test_torch_compile_follows_changing_m():
    """A second M makes torch.compile retrace with a symbolic M: the workspace size must stay traceable."""
    compiled = torch.compile(lambda x, w: _gemm.gemm(x, w, activation="silu"), fullgraph=True)
    w = randn((40, 1032), dtype=torch.bfloat16, seed=3)
    for m in (3, 5, 17, 33):
        x = randn((m, 1032), dtype=torch.bfloat16, seed=m)
        assert torch.equal(compiled(x, w), _gemm.gemm(x, w, activation="silu")), m


# -- B given k-major (x @ weight with weight (K, N)): the backward passes' layout ----------------------

@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 24, 136), (17, 40, 72), (130, 136, 24), (5, 40, 17 * 64 - 56)],
                         ids=lambda s: "x".join(map(str, s)))
def test_transposed_weight_matches_oracle(device, shape):
    """out = x @ w for w (K, N) (ldmatrix.trans fragments on the CUDA kernel; a transposed copy on the
    CPU), every tiling's tails, split K (the last shape), with bias and silu."""
    m, n, k = shape
    x, w, extras = make(m, n, k, torch.bfloat16, device, seed=m + n, bias=True)
    w_kn = w.T.contiguous()
    out = _gemm.gemm(x, w_kn, transposed_weight=True, activation="silu", **extras)
    oracle = reference.gemm(x, w, activation="silu", **extras, out_dtype=torch.float64)
    assert_parity(out, torch_same_precision(x, w, activation="silu", **extras), oracle, f"k-major {shape}")


@pytest.mark.emu
@pytest.mark.parametrize("tiling", sorted(TILINGS))
def test_emulated_transposed_weight_every_tiling_without_bank_conflicts(tiling):
    m, n, k = TILINGS[tiling]
    x, w, extras = make(m, n, k, torch.bfloat16, "cpu", seed=9, bias=True)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate():
        out = _gemm.gemm(x, w.T.contiguous(), transposed_weight=True, out_dtype=torch.float32, **extras)
    oracle = reference.gemm(x, w, **extras, out_dtype=torch.float64)
    assert_parity(out, (x.float() @ w.float().T) + extras["bias"], oracle, f"emulated k-major, {tiling}")
    (report,) = [r for r in llmkernels.emulator.report() if r["kernel"] == "gemm"]
    assert report["bank_conflicts_by_site"] == {}, report
    assert report["shared_wavefronts"] == report["shared_ideal_wavefronts"]


def test_transposed_weight_shape_errors():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., K\) with K = 24 \(weight's rows\)"):
        _gemm.gemm(x, torch.randn(24, 8, dtype=torch.bfloat16), transposed_weight=True)
