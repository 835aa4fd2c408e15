"""llmkernels.reference.lora (the LoRA oracle) against independent computations.

- The dropout mask: the NumPy Philox4x32-10 of philox_numpy.py (uint64 arithmetic) with the
  counter and key of the documented contract, Random123's known answers, the library's C++ Philox
  (C.testing.philox4x32_10), the threshold's boundary, the keep rate within 6 standard deviations.
- lora_linear: a PEFT-style composition of nn.Linear modules (the base layer, lora_A, lora_B) with
  the dropout replaced by the mask; multi-adapter and sliced inputs against a per-row Python loop
  over float64 vectors with the rank padding zeroed (not sliced); slices against one separate LoRA
  per slice; gradients by gradcheck and against the composition's autograd; 16-bit inputs by the
  parity rule (helpers.assert_parity); an int4 base against llmkernels.quant.dequantize.
- merge / unmerge: the float64 formula; the round trip within one unit in the last place.
Float64 comparisons use torch.testing.assert_close's float64 defaults.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from llmkernels import quant
from llmkernels._ext import C
from llmkernels.reference import lora

from helpers import one_thread, assert_parity, generator, randn, randn_list  # noqa: F401 (one_thread: an autouse fixture)
from philox_numpy import philox4x32_10 as numpy_philox

STREAM = 0x4C6F5241     # "LoRA", the contract's c2


# -- independent oracles -------------------------------------------------------------------------

def numpy_words(seed, start, count):
    """The contract's word of every linear index in [start, start + count), by NumPy's Philox."""
    seed %= 2**64
    index = np.arange(start, start + count, dtype=np.uint64)
    group = index // np.uint64(4)
    words = numpy_philox(group & np.uint64(0xFFFFFFFF), group >> np.uint64(32), np.full_like(group, STREAM),
                         np.zeros_like(group), seed & 0xFFFFFFFF, seed >> 32)
    return np.stack(words)[(index % np.uint64(4)).astype(np.int64), np.arange(count)]


def numpy_keep(seed, rows, cols, p):
    threshold = min(math.floor(Fraction(p) * 2**32), 2**32 - 1)        # exact rational arithmetic
    return torch.from_numpy(numpy_words(seed, 0, rows * cols) >= threshold).reshape(rows, cols)


def peft(x, weight, bias, lora_a, lora_b, scale, keep=None, p=0.0):
    """PEFT's LoRA Linear: base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, from nn.Linear
    modules called with the given tensors (so gradients reach them); dropout = the mask times
    1 / (1 - p) (torch's CUDA dropout arithmetic)."""
    (n, k), r = weight.shape, lora_a.shape[0]
    kw = dict(device="meta", dtype=x.dtype)
    base = nn.Linear(k, n, bias=bias is not None, **kw)
    lora_A, lora_B = nn.Linear(k, r, bias=False, **kw), nn.Linear(r, n, bias=False, **kw)
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    dropped = x if keep is None else x * keep * (1.0 / (1.0 - p))
    return functional_call(base, params, (x,)) + functional_call(
        lora_B, {"weight": lora_b}, (functional_call(lora_A, {"weight": lora_a}, (dropped,)),)) * scale


def loop_oracle(x, weight, bias, lora_a, lora_b, scales, ids, ranks, slices, keep=None, p=0.0):
    """Row by row in float64: lora_a (L, S, r, K), lora_b (L, N, r), scales[l][s] floats, ids a list;
    the rank padding zeroed by a mask (so it gets zero gradients too)."""
    x, weight, lora_a, lora_b = (t.double() for t in (x, weight, lora_a, lora_b))
    rank = lora_a.shape[2]
    dropped = x if keep is None else x * keep / (1 - p)
    rows = []
    for m, adapter in enumerate(ids):
        y = weight @ x[m] + (0 if bias is None else bias.double())
        if adapter >= 0:
            used = (torch.arange(rank) < ranks[adapter]).double()            # (r,) 1 inside the rank
            delta, start = [], 0
            for s, width in enumerate(slices):
                a = lora_a[adapter, s] * used[:, None]
                b = lora_b[adapter, start:start + width] * used[None, :]
                delta.append(scales[adapter][s] * (b @ (a @ dropped[m])))
                start += width
            y = y + torch.cat(delta)
        rows.append(y)
    return torch.stack(rows) if rows else torch.zeros(0, weight.shape[0], dtype=torch.float64)


def make(m, k, n, rank, lead=(), dtype=torch.float64, seed=0):
    """x, weight, bias, lora_a (*lead, r, K), lora_b (N, r): normal values scaled like a trained layer."""
    x, w, b, a, bb = randn_list([(m, k), (n, k), (n,), (*lead, rank, k), (n, rank)], seed=seed)
    return [t.to(dtype) for t in (x, w / math.sqrt(k), b, a / math.sqrt(k), bb / math.sqrt(rank))]


def adapter_ids(pattern, m, adapters, seed=0):
    g = generator(seed)
    ids = torch.randint(-1, adapters, (m,), generator=g)
    if pattern == "no_none":
        ids = ids.clamp(min=0)
    elif pattern == "all_none":
        ids = torch.full((m,), -1)
    elif pattern == "one":
        ids = torch.full((m,), adapters - 1)
    return ids.to(torch.int32)


# -- the dropout mask ----------------------------------------------------------------------------

@pytest.mark.parametrize("counter,key,expected", [  # Random123's known-answer vectors (test_mezo.py's)
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_known_answers(counter, key, expected):
    assert [int(w) for w in lora.philox4x32_10(*counter, *key)] == expected


def test_philox_matches_numpy_and_the_library():
    g = generator(1)
    counters = torch.randint(0, 2**32, (4, 4000), generator=g, dtype=torch.int64)
    keys = [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (12345, 2**31 + 7)]
    for k0, k1 in keys:
        ours = torch.stack(lora.philox4x32_10(*counters, k0, k1))
        theirs = np.stack(numpy_philox(*counters.numpy().astype(np.uint64), k0, k1)).astype(np.int64)
        assert torch.equal(ours, torch.from_numpy(theirs))
        for j in (0, 1, 2999):
            assert ours[:, j].tolist() == C.testing.philox4x32_10(counters[:, j].tolist(), [k0, k1])


@pytest.mark.parametrize("seed,rows,cols,p", [
    (0, 7, 13, 0.5), (2**32 + 5, 33, 31, 0.1), (2**64 - 1, 3, 129, 0.9), (-1, 3, 129, 0.9), (12345, 1, 1, 0.3),
    (7, 16, 64, 0.0), (99, 5, 3, 1 - 2**-53), (3, 0, 5, 0.5)])
def test_dropout_keep_matches_numpy(seed, rows, cols, p):
    keep = lora.dropout_keep(seed, rows, cols, p)
    assert keep.dtype == torch.bool and keep.shape == (rows, cols)
    assert torch.equal(keep, numpy_keep(seed, rows, cols, p))
    if p == 0:
        assert keep.all()


def test_random_words_at_large_indices():
    """Counters past 2^32 groups (c1 != 0), starts that are not a multiple of 4."""
    for seed, start, count in [(5, 2**34 + 3, 17), (2**40 + 1, 4 * 2**40 - 2, 9), (0, 2**62 + 1, 6)]:
        words = lora.random_words(seed, start, count)
        assert torch.equal(words, torch.from_numpy(numpy_words(seed, start, count).astype(np.int64)))
    # A prefix and a shifted window of one stream agree.
    assert torch.equal(lora.random_words(9, 0, 40)[5:], lora.random_words(9, 5, 35))


def test_dropout_threshold_boundary():
    assert lora.dropout_threshold(0.1) == 429496729           # floor(0.1 * 2^32) of the float64 0.1
    assert lora.dropout_threshold(0.5) == 2**31
    assert lora.dropout_threshold(1 - 2**-53) == 2**32 - 1
    word = int(numpy_words(7, 0, 8)[5])
    # Kept iff word >= threshold: at p = word / 2^32 (exact) the element stays, one more and it goes.
    assert lora.dropout_keep(7, 2, 4, word / 2**32)[1, 1]
    assert not lora.dropout_keep(7, 2, 4, (word + 1) / 2**32)[1, 1]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_rate(p):
    rows, cols = 256, 1031
    n = rows * cols
    sigma = math.sqrt(p * (1 - p) / n)
    for seed in (0, 1, 2**63 + 11):
        keep = lora.dropout_keep(seed, rows, cols, p)
        assert abs(keep.double().mean().item() - (1 - p)) < 6 * sigma
    # Two seeds' masks agree on p^2 + (1 - p)^2 of the elements, as independent masks do.
    agree = (lora.dropout_keep(1, rows, cols, p) == lora.dropout_keep(2, rows, cols, p)).double().mean().item()
    expected = p * p + (1 - p) * (1 - p)
    assert abs(agree - expected) < 6 * math.sqrt(expected * (1 - expected) / n)


# -- lora_linear: one adapter --------------------------------------------------------------------

@pytest.mark.parametrize("m,k,n,rank,p,with_bias", [
    (37, 48, 40, 8, 0.0, True), (1, 48, 40, 8, 0.25, True), (6, 63, 5, 3, 0.5, False), (42, 16, 65, 16, 0.1, True)])
def test_single_adapter_against_peft(m, k, n, rank, p, with_bias):
    x, w, bias, a, b = make(m, k, n, rank, seed=m + k)
    bias = bias if with_bias else None
    scale = lora.scaling(16, rank)
    keep = numpy_keep(31, m, k, p) if p else None
    out = lora.lora_linear(x, w, a, b, scale, bias=bias, dropout_p=p, seed=31)
    assert out.dtype == torch.float64 and out.shape == (m, n)
    expected = peft(x, w, bias, a, b, scale, keep, p)
    torch.testing.assert_close(out, expected)
    # The adapter contributes: without it the answer is far from the base layer's.
    assert (out - peft(x, w, bias, a, b, 0.0)).abs().max() > 0.1
    # Gradients against the composition's autograd.
    inputs = [t.requires_grad_() for t in (x, a, b) + ((bias,) if with_bias else ())]
    g = randn(out.shape, dtype=torch.float64, seed=3)
    actual = torch.autograd.grad((lora.lora_linear(x, w, a, b, scale, bias=bias, dropout_p=p, seed=31) * g).sum(),
                                 inputs)
    torch.testing.assert_close(actual, torch.autograd.grad((peft(x, w, bias, a, b, scale, keep, p) * g).sum(), inputs))


def test_scaling():
    assert lora.scaling(16, 8) == 2.0
    assert lora.scaling(16, 4, rslora=True) == 8.0


def test_seed_forms_are_one_seed():
    x, w, _, a, b = make(9, 16, 8, 4, seed=2)
    out = lora.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=2**64 - 1)
    assert torch.equal(out, lora.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=-1))
    assert torch.equal(out, lora.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=torch.tensor(-1)))
    assert not torch.equal(out, lora.lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=2))


# -- lora_linear: many adapters, slices ----------------------------------------------------------

MULTI_CASES = [  # m, adapters, rank, ranks, pattern, slices, p
    (37, 4, 8, None, "mixed", None, 0.0),
    (37, 4, 8, [8, 2, 5, 0], "mixed", None, 0.0),
    (1, 3, 4, [1, 4, 2], "one", None, 0.3),
    (1, 3, 4, None, "all_none", None, 0.0),
    (23, 2, 6, [3, 6], "no_none", (8, 4, 4), 0.2),
    (15, 3, 5, [5, 1, 3], "mixed", (10, 6), 0.0),
    (0, 2, 4, None, "mixed", None, 0.1),
]


@pytest.mark.parametrize("m,adapters,rank,ranks,pattern,slices,p", MULTI_CASES,
                         ids=[f"M{c[0]}-L{c[1]}-r{c[2]}-{c[4]}-{'ranks' if c[3] else 'full'}-"
                              f"{'sliced' if c[5] else 'dense'}-p{c[6]}" for c in MULTI_CASES])
def test_multi_adapter_against_a_loop(m, adapters, rank, ranks, pattern, slices, p):
    k, n = 24, 16
    num_slices = len(slices) if slices else 1
    x, w, bias, _, _ = make(m, k, n, rank, seed=m)
    a, b = randn_list([(adapters, num_slices, rank, k), (adapters, n, rank)], dtype=torch.float64, seed=m + 1)
    scale = torch.rand(adapters, num_slices, generator=generator(5), dtype=torch.float64) + 0.5
    ids = adapter_ids(pattern, m, adapters, seed=m + 2)
    kwargs = dict(bias=bias, adapter_ids=ids, ranks=ranks, dropout_p=p, seed=77)
    inputs = [t.requires_grad_() for t in (x, a, b, bias)]
    a_arg, scale_arg = (a, scale) if slices else (a[:, 0], scale[:, 0])       # (L, S, r, K) or (L, r, K)
    out = lora.lora_linear(x, w, a_arg, b, scale_arg, slices=slices, **kwargs)
    full_ranks = ranks or [rank] * adapters
    keep = numpy_keep(77, m, k, p) if p else None
    expected = loop_oracle(x, w, bias, a, b, scale.tolist(), ids.tolist(), full_ranks, slices or (n,), keep, p)
    assert out.shape == (m, n)
    torch.testing.assert_close(out, expected)
    if m == 0:
        return
    none = ids == -1
    if none.any():   # no adapter: exactly the base layer
        assert torch.equal(out[none], nn.functional.linear(x, w, bias)[none])
    g = randn(out.shape, dtype=torch.float64, seed=9)
    actual = torch.autograd.grad((out * g).sum(), inputs, materialize_grads=True)   # (all_none: a, b unused)
    torch.testing.assert_close(actual, torch.autograd.grad((expected * g).sum(), inputs, materialize_grads=True))
    # Padding past an adapter's rank and unused adapters get zero gradients.
    for adapter, r in enumerate(full_ranks):
        if adapter not in ids.tolist():
            r = 0
        assert (actual[1][adapter, :, r:] == 0).all() and (actual[2][adapter, :, r:] == 0).all()


def test_rank_padding_is_never_read():
    x, w, bias, _, _ = make(19, 24, 16, 8, seed=3)
    a, b = randn_list([(3, 8, 24), (3, 16, 8)], dtype=torch.float64, seed=4)
    ranks, ids = [2, 8, 5], adapter_ids("mixed", 19, 3, seed=5)
    out = lora.lora_linear(x, w, a, b, 2.0, bias=bias, adapter_ids=ids, ranks=ranks)
    a_nan, b_nan = a.clone(), b.clone()
    for adapter, r in enumerate(ranks):
        a_nan[adapter, r:] = float("nan")
        b_nan[adapter, :, r:] = float("inf")
    assert torch.equal(out, lora.lora_linear(x, w, a_nan, b_nan, 2.0, bias=bias, adapter_ids=ids, ranks=ranks))
    # ...and it is not the full-rank answer.
    assert not torch.allclose(out, lora.lora_linear(x, w, a, b, 2.0, bias=bias, adapter_ids=ids))


def test_int64_ids_and_scale_forms():
    x, w, bias, _, _ = make(11, 16, 8, 4, seed=6)
    a, b = randn_list([(3, 4, 16), (3, 8, 4)], dtype=torch.float64, seed=7)
    ids = adapter_ids("mixed", 11, 3, seed=8)
    out = lora.lora_linear(x, w, a, b, 0.5, adapter_ids=ids)
    assert torch.equal(out, lora.lora_linear(x, w, a, b, 0.5, adapter_ids=ids.long()))
    assert torch.equal(out, lora.lora_linear(x, w, a, b, torch.full((3,), 0.5), adapter_ids=ids))
    assert torch.equal(out, lora.lora_linear(x, w, a, b, torch.tensor(0.5), adapter_ids=ids))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_slices_against_separate_loras(p):
    """A fused QKV projection: one call equals three separate PEFT layers on the weight's row blocks,
    all under one dropout mask."""
    m, k, slices = 13, 32, (16, 8, 8)
    x, w, bias, a, b = make(m, k, sum(slices), 4, lead=(3,), seed=10)
    scale = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    keep = numpy_keep(5, m, k, p) if p else None
    out = lora.lora_linear(x, w, a, b, scale, bias=bias, slices=slices, dropout_p=p, seed=5)
    edges = np.cumsum((0,) + slices)
    expected = torch.cat([peft(x, w[lo:hi], bias[lo:hi], a[s], b[lo:hi], scale[s].item(), keep, p)
                          for s, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))], dim=1)
    torch.testing.assert_close(out, expected)
    # One scale for every slice.
    torch.testing.assert_close(lora.lora_linear(x, w, a, b, 2.0, slices=slices),
                               lora.lora_linear(x, w, a, b, torch.full((3,), 2.0), slices=slices))


def test_gradcheck():
    """Everything at once on tiny float64 shapes: adapters with mixed ranks and none, slices,
    dropout, bias."""
    x, w, bias, _, _ = make(5, 6, 7, 3, seed=12)
    a, b = randn_list([(3, 2, 3, 6), (3, 7, 3)], dtype=torch.float64, seed=13)
    ids = torch.tensor([0, -1, 2, 1, 0], dtype=torch.int32)
    scale = torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.25, 3.0]], dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, a, b, bias))
    assert torch.autograd.gradcheck(
        lambda x, a, b, bias: lora.lora_linear(x, w, a, b, scale, bias=bias, adapter_ids=ids, ranks=[3, 1, 2],
                                               slices=(3, 4), dropout_p=0.4, seed=11), inputs)


# -- precisions and the int4 base ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi-sliced"])
def test_low_precision(dtype, multi):
    m, k, n, rank = 61, 96, 80, 16
    x, w, bias, a, b = make(m, k, n, rank, dtype=dtype, seed=20)
    kwargs = dict(bias=bias, dropout_p=0.1, seed=4)
    ids, scales, ranks, slices = [0] * m, [[2.0]], [rank], (n,)
    if multi:
        ids, slices, ranks = adapter_ids("mixed", m, 2, seed=21), (48, 32), [16, 7]
        a, b = (t.to(dtype) for t in randn_list([(2, 2, rank, k), (2, n, rank)], seed=22))
        a, b = a / math.sqrt(k), b / math.sqrt(rank)
        scales = [[2.0, 0.5], [1.0, 4.0]]
        kwargs.update(adapter_ids=ids, ranks=ranks, slices=slices)
        ids = ids.tolist()
    scale = torch.tensor(scales) if multi else 2.0
    a4 = a if multi else a[None, None]
    b4 = b if multi else b[None]
    expected = loop_oracle(x, w, bias, a4, b4, scales, ids, ranks, slices, numpy_keep(4, m, k, 0.1), 0.1)
    oracle = lora.lora_linear(x, w, a, b, scale, compute_dtype=torch.float64, out_dtype=torch.float64, **kwargs)
    torch.testing.assert_close(oracle, expected)
    upcast = lora.lora_linear(x, w, a, b, scale, **kwargs)
    same_precision = lora.lora_linear(x, w, a, b, scale, upcast=False, **kwargs)
    assert upcast.dtype == same_precision.dtype == dtype
    # Rounding once is within the parity bound of PEFT in x's dtype, and strictly better than it.
    assert_parity(upcast, same_precision, expected, "lora_linear")
    assert (upcast.double() - expected).abs().max() < (same_precision.double() - expected).abs().max()
    out32 = lora.lora_linear(x, w, a, b, scale, out_dtype=torch.float32, **kwargs)
    torch.testing.assert_close(out32.double(), expected, rtol=1e-5, atol=1e-5)
    if not multi:   # upcast=False is PEFT's own arithmetic, bit for bit
        keep = numpy_keep(4, m, k, 0.1)
        assert torch.equal(same_precision, peft(x, w, bias, a, b, 2.0, keep, 0.1))


def test_float32_paths_agree():
    x, w, bias, a, b = make(33, 40, 24, 8, dtype=torch.float32, seed=23)
    torch.testing.assert_close(lora.lora_linear(x, w, a, b, 2.0, bias=bias),
                               lora.lora_linear(x, w, a, b, 2.0, bias=bias, upcast=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int4_base(dtype):
    """QLoRA: the int4 weight acts as its dequantization (llmkernels.quant.dequantize)."""
    m, k, n, rank = 9, 64, 40, 8
    x, w, bias, a, b = make(m, k, n, rank, dtype=dtype, seed=24)
    w4 = quant.quantize_int4(w.float(), group_size=32)
    dense = quant.dequantize(w4, torch.float64)
    assert (dense - w.double()).abs().max() > 1e-3              # the quantization shows
    kwargs = dict(bias=bias, dropout_p=0.2, seed=8)
    expected = loop_oracle(x, dense, bias, a[None, None], b[None], [[1.5]], [0] * m, [rank], (n,),
                           numpy_keep(8, m, k, 0.2), 0.2)
    oracle = lora.lora_linear(x, w4, a, b, 1.5, compute_dtype=torch.float64, out_dtype=torch.float64, **kwargs)
    torch.testing.assert_close(oracle, expected)
    out = lora.lora_linear(x, w4, a, b, 1.5, **kwargs)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype))
    # upcast=False: the dequantized weight rounded to x's dtype, then PEFT's arithmetic.
    assert torch.equal(lora.lora_linear(x, w4, a, b, 1.5, upcast=False, **kwargs),
                       lora.lora_linear(x, quant.dequantize(w4, dtype), a, b, 1.5, upcast=False, **kwargs))


# -- merge / unmerge -----------------------------------------------------------------------------

def spacing(t):
    """The distance from |t| to the next value up in t's dtype, as float64."""
    magnitude = t.abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude).double()


def test_merge_float64():
    x, w, bias, a, b = make(17, 40, 24, 8, seed=30)
    merged = lora.merge(w, a, b, 1.5)
    torch.testing.assert_close(merged, w + 1.5 * torch.einsum("nr,rk->nk", b, a))
    torch.testing.assert_close(x @ merged.T + bias, lora.lora_linear(x, w, a, b, 1.5, bias=bias))
    torch.testing.assert_close(lora.unmerge(merged, a, b, 1.5), w, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_merge_then_unmerge_is_within_one_rounding(dtype):
    _, w, _, a, b = make(1, 96, 80, 16, dtype=dtype, seed=31)
    exact = w.double() + 2.0 * b.double() @ a.double()
    magnitude = w.double().abs() + 2.0 * b.double().abs() @ a.double().abs()
    merged = lora.merge(w, a, b, 2.0)
    assert merged.dtype == dtype
    # merge: the exact value rounded to w's dtype, give or take float32 arithmetic's error (at most
    # 18 roundings of 2^-24 over the 16 products and the sum: the classic gamma_n bound).
    assert ((merged.double() - exact).abs() <= 0.5 * spacing(merged) + 18 * 2**-24 * magnitude).all()
    restored = lora.unmerge(merged, a, b, 2.0)
    error = (restored.double() - w.double()).abs()
    assert (error <= spacing(merged) + 1e-6 * merged.double().abs()).all()
    assert error.max() > 0                      # restores only up to rounding, as documented


# -- errors --------------------------------------------------------------------------------------

def test_dropout_errors():
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\); got 1.0"):
        lora.dropout_keep(0, 2, 2, 1.0)
    with pytest.raises(ValueError, match="dropout_p must be a number"):
        lora.dropout_keep(0, 2, 2, -0.1)
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
        lora.dropout_keep(2**64, 2, 2, 0.5)
    with pytest.raises(TypeError, match="seed must be an int or a one-element integer tensor; got float"):
        lora.dropout_keep(1.0, 2, 2, 0.5)
    with pytest.raises(TypeError, match="seed must be an int"):
        lora.dropout_keep(torch.tensor([1, 2]), 2, 2, 0.5)
    with pytest.raises(ValueError, match="rows must be a non-negative int; got -1"):
        lora.dropout_keep(0, -1, 2, 0.5)


def test_lora_linear_errors():
    x, w, bias, a, b = make(5, 16, 8, 4, dtype=torch.float32, seed=40)
    ids = torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32)
    a3, b3 = a.expand(2, 4, 16), b.expand(2, 8, 4)
    f = lora.lora_linear
    cases = [
        (ValueError, "x must have 2 dimensions", lambda: f(x[None], w, a, b, 1.0)),
        (TypeError, "x must be a float16.*got torch.int64", lambda: f(x.long(), w, a, b, 1.0)),
        (ValueError, r"weight must have shape \(out_features, in_features=16\).*got \(8, 15\)",
         lambda: f(x, w[:, :15], a, b, 1.0)),
        (TypeError, r"weight must have x's dtype \(torch.float32\); got torch.float64",
         lambda: f(x, w.double(), a, b, 1.0)),
        (TypeError, "lora_a must have x's dtype", lambda: f(x, w, a.half(), b, 1.0)),
        (TypeError, "lora_b must have x's dtype", lambda: f(x, w, a, b.bfloat16(), 1.0)),
        (TypeError, "bias must have x's dtype", lambda: f(x, w, a, b, 1.0, bias=bias.double())),
        (ValueError, r"bias must have shape \(8,\)", lambda: f(x, w, a, b, 1.0, bias=bias[:7])),
        (ValueError, "lora_a must have 2 dimensions", lambda: f(x, w, a3, b, 1.0)),
        (ValueError, r"lora_a's last dimension must be in_features 16", lambda: f(x, w, a[:, :8], b, 1.0)),
        (ValueError, r"lora_b must end in \(out_features=8, rank=4\).*got shape \(8, 3\)",
         lambda: f(x, w, a, b[:, :3], 1.0)),                                           # rank mismatch
        (ValueError, r"lora_b must end in \(out_features=8, rank=4\).*got shape \(7, 4\)",
         lambda: f(x, w, a, b[:7], 1.0)),
        (ValueError, "lora_b must have 3 dimensions", lambda: f(x, w, a3, b, 1.0, adapter_ids=ids)),
        (ValueError, "one number of adapters; got 2.*and 3", lambda: f(x, w, a3, b.expand(3, 8, 4), 1.0,
                                                                        adapter_ids=ids)),
        (ValueError, r"adapter_ids must lie in \[-1, 2\).*from -1 to 2",
         lambda: f(x, w, a3, b3, 1.0, adapter_ids=torch.where(ids == 1, 2, ids))),
        (ValueError, r"adapter_ids must lie in \[-1, 2\).*from -2", lambda: f(x, w, a3, b3, 1.0, adapter_ids=ids - 1)),
        (TypeError, "adapter_ids must be an int32 or int64 tensor; got torch.float32",
         lambda: f(x, w, a3, b3, 1.0, adapter_ids=ids.float())),
        (ValueError, r"adapter_ids must have shape \(5,\)", lambda: f(x, w, a3, b3, 1.0, adapter_ids=ids[:4])),
        (ValueError, r"ranks must lie in \[0, 4\].*got \[4, 5\]",
         lambda: f(x, w, a3, b3, 1.0, adapter_ids=ids, ranks=[4, 5])),
        (ValueError, "ranks must be 2 ints", lambda: f(x, w, a3, b3, 1.0, adapter_ids=ids, ranks=[4])),
        (TypeError, "ranks must hold integers", lambda: f(x, w, a3, b3, 1.0, adapter_ids=ids,
                                                          ranks=torch.tensor([1.0, 2.0]))),
        (ValueError, "ranks needs adapter_ids", lambda: f(x, w, a, b, 1.0, ranks=[2])),
        (ValueError, r"scale must be a number, a 0-d tensor or a tensor of shape \(2,\); got shape \(3,\)",
         lambda: f(x, w, a3, b3, torch.ones(3), adapter_ids=ids)),
        (ValueError, r"scale must .* of shape \(\); got shape \(1,\)", lambda: f(x, w, a, b, torch.ones(1))),
        (TypeError, "scale must be a number or a float tensor; got str", lambda: f(x, w, a, b, "2")),
        (TypeError, "scale must be a number or a float tensor; got torch.int64",
         lambda: f(x, w, a, b, torch.tensor(2))),
        (ValueError, "slices must be positive ints summing to out_features 8; got \\(4, 3\\)",
         lambda: f(x, w, a.expand(2, 4, 16), b, 1.0, slices=(4, 3))),
        (ValueError, "slices must be positive ints", lambda: f(x, w, a.expand(2, 4, 16), b, 1.0, slices=(8, 0))),
        (ValueError, "lora_a must have 2 slices", lambda: f(x, w, a.expand(3, 4, 16), b, 1.0, slices=(4, 4))),
        (ValueError, "lora_a must have 4 dimensions", lambda: f(x, w, a3, b3, 1.0, slices=(4, 4), adapter_ids=ids)),
        (ValueError, r"scale must .* shape \(2, 2\)", lambda: f(x, w, a3[:, None].expand(2, 2, 4, 16), b3,
                                                                torch.ones(2), slices=(4, 4), adapter_ids=ids)),
        (ValueError, r"dropout_p must be a number in \[0, 1\); got 1", lambda: f(x, w, a, b, 1.0, dropout_p=1, seed=0)),
        (ValueError, "dropout_p = 0.5 needs a seed", lambda: f(x, w, a, b, 1.0, dropout_p=0.5)),
        (TypeError, "seed must be an int", lambda: f(x, w, a, b, 1.0, dropout_p=0.5, seed=0.5)),
        (ValueError, "compute_dtype must be None with upcast=False", lambda: f(x, w, a, b, 1.0, upcast=False,
                                                                               compute_dtype=torch.float64)),
        (TypeError, "compute_dtype must be torch.float32 or torch.float64", lambda: f(x, w, a, b, 1.0,
                                                                                      compute_dtype=torch.float16)),
        (RuntimeError, "must be on one device; got x on cpu, weight on cpu, lora_a on meta",
         lambda: f(x, w, a.to("meta"), b, 1.0)),
        (RuntimeError, "bias on meta", lambda: f(x, w, a, b, 1.0, bias=bias.to("meta"))),
        (RuntimeError, "scale on meta", lambda: f(x, w, a3, b3, torch.ones(2, device="meta"), adapter_ids=ids)),
        (ValueError, r"weight must have shape \(out_features, in_features=16\).*got \(8, 32\)",
         lambda: f(x, quant.quantize_int4(torch.ones(8, 32), group_size=32), a, b, 1.0)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_merge_errors():
    _, w, _, a, b = make(1, 16, 8, 4, dtype=torch.float32, seed=41)
    with pytest.raises(TypeError, match="an Int4Weight cannot absorb an adapter"):
        lora.merge(quant.quantize_int4(w, group_size=-1), a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_b must have shape \(out_features=8, rank=4\)"):
        lora.merge(w, a, b[:, :3], 1.0)
    with pytest.raises(ValueError, match=r"lora_a must have shape \(rank, in_features=16\)"):
        lora.unmerge(w, a[:, :8], b, 1.0)
    with pytest.raises(TypeError, match=r"lora_a must have weight's dtype \(torch.float32\)"):
        lora.merge(w, a.double(), b, 1.0)
    with pytest.raises(TypeError, match="scale must be a number"):
        lora.merge(w, a, b, torch.ones(2))
    with pytest.raises(RuntimeError, match="one device"):
        lora.merge(w, a, b.to("meta"), 1.0)
