"""llmkernels.reference.attention (the attention oracle) against independent float64 computations.

- torch.nn.functional.scaled_dot_product_attention in float64 on the CPU, with masks built here by
  other means (tril/triu for bottom-right causal and windows, a Python table of distances for
  ALiBi) and GQA by repeat_interleave of k and v; the LSE is torch.logsumexp of the float64 scores.
  Rows that keep no key are expected to give out = 0 and lse = +inf (flash-attn's convention).
- Softcap (which SDPA lacks): a per-head float64 matmul with tanh written as 1 - 2 / (e^2x + 1).
- Gradients: torch.autograd.grad of the reference against those of the oracles, all in float64.
- Varlen: packed sequences (empty and single-token ones included) against SDPA on the padded
  batch, with the key padding and each sequence's bottom-right alignment in the mask.
- bf16/fp16/fp32 inputs: the parity rule (helpers.assert_parity) against the float64 oracle, with
  SDPA in the same precision as PyTorch's own error.
Float64 comparisons use torch.testing.assert_close's float64 defaults.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmkernels.reference import attention as reference

from helpers import one_thread, assert_parity, randn, randn_list  # noqa: F401 (one_thread: an autouse fixture)

INF = float("inf")


# -- independent oracles -------------------------------------------------------------------------

def keep_mask(sq, sk, causal=False, window=(-1, -1)):
    """(sq, sk) bool: which keys each query keeps; the diagonal of tril/triu is shifted by sk - sq
    (bottom-right alignment)."""
    full = torch.ones(sq, sk, dtype=torch.bool)
    keep = full.clone()
    left, right = window
    if causal:
        keep &= full.tril(sk - sq)
    if right >= 0:
        keep &= full.tril(sk - sq + right)
    if left >= 0:
        keep &= full.triu(sk - sq - left)
    return keep


def alibi_bias(slopes, batch, heads, sq, sk):
    """(batch, heads, sq, sk) float64: -slope * distance between key j and query i's key position."""
    distance = torch.tensor([[abs(sk - sq + i - j) for j in range(sk)] for i in range(sq)],
                            dtype=torch.float64).reshape(sq, sk)
    slopes = slopes.double().reshape(-1, heads).expand(batch, heads)
    return -slopes[:, :, None, None] * distance


def sdpa_oracle(q, k, v, keep, bias=None, scale=None):
    """float64 SDPA. q (b, sq, hq, d), k and v (b, sk, hk, d); keep (sq, sk) or (b, sq, sk) bool;
    bias broadcastable to (b, hq, sq, sk). Returns out (b, sq, hq, d) and lse (b, hq, sq)."""
    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(group, dim=2).transpose(1, 2)
    keep = keep.reshape(-1, 1, *keep.shape[-2:])
    mask = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -INF)
    if bias is not None:
        mask = mask + bias
    has_key = keep.any(dim=-1, keepdim=True)
    mask = torch.where(has_key, mask, 0.0)            # rows without keys: finite here, zeroed below
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale) * has_key
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    lse = torch.logsumexp(qt @ kt.transpose(-1, -2) * scale + mask, dim=-1)
    lse = torch.where(has_key[..., 0], lse, INF)
    return out.transpose(1, 2), lse


def softcap_oracle(q, k, v, cap, scale, keep, bias=None):
    """Per-head float64 matmuls; every row must keep a key."""
    group = q.shape[2] // k.shape[2]
    outs, lses = [], []
    for h in range(q.shape[2]):
        x = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) * scale
        s = cap * (1 - 2 / (torch.exp(2 * x / cap) + 1))
        if bias is not None:
            s = s + bias[:, h]
        s = s.masked_fill(~keep, -INF)
        m = s.amax(dim=-1, keepdim=True)
        e = torch.exp(s - m)
        outs.append(e @ v[:, :, h // group] / e.sum(dim=-1, keepdim=True))
        lses.append((m + e.sum(dim=-1, keepdim=True).log())[..., 0])
    return torch.stack(outs, dim=2), torch.stack(lses, dim=1)


def grads(out, inputs, seed=99):
    g = randn(out.shape, dtype=out.dtype, seed=seed)
    return torch.autograd.grad((out * g).sum(), inputs)


def make(batch, sq, sk, hq, hk, d, dtype=torch.float64, seed=0):
    q, k, v = randn_list([(batch, sq, hq, d), (batch, sk, hk, d), (batch, sk, hk, d)], seed=seed)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected)


# -- the dense API against SDPA ------------------------------------------------------------------

SEQLENS = [(1, 17), (17, 1), (113, 17), (17, 113), (17, 17), (5, 3)]
HEADS = [(2, 2), (4, 1), (8, 1), (8, 2)]
MASKS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(3, 5)),
    "window_left": dict(window=(4, -1)),
    "window_right": dict(window=(-1, 2)),
    "window_zero": dict(window=(0, 0)),
    "causal_window": dict(causal=True, window=(7, 9)),        # causal: right = 0
    "alibi": dict(alibi="heads"),
    "alibi_batch_causal": dict(alibi="batch", causal=True),
    "alibi_window_scale": dict(alibi="heads", window=(6, 1), softmax_scale=0.3),
}


def run_case(sq, sk, hq, hk, d, causal=False, window=(-1, -1), alibi=None, softmax_scale=None, batch=2, seed=0):
    q, k, v = make(batch, sq, sk, hq, hk, d, seed=seed)
    slopes = None
    if alibi is not None:
        shape = (hq,) if alibi == "heads" else (batch, hq)
        slopes = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.5
    out, lse = reference.attention(q, k, v, causal=causal, window=window, alibi_slopes=slopes,
                                   softmax_scale=softmax_scale, return_lse=True)
    bias = None if slopes is None else alibi_bias(slopes, batch, hq, sq, sk)
    expected, expected_lse = sdpa_oracle(q, k, v, keep_mask(sq, sk, causal, window), bias, softmax_scale)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_same(out, expected)
    assert_same(lse, expected_lse)
    assert_same(grads(out, (q, k, v)), grads(expected, (q, k, v)))
    return out, lse


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("sq,sk", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
def test_masks_and_seqlens_match_sdpa(sq, sk, mask):
    index = SEQLENS.index((sq, sk)) + list(MASKS).index(mask)
    hq, hk = HEADS[index % len(HEADS)]
    run_case(sq, sk, hq, hk, (32, 40, 64)[index % 3], **MASKS[mask], seed=index)


@pytest.mark.parametrize("d", [32, 40, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("hq,hk", [(3, 3), (4, 1), (8, 1)], ids=["ratio1", "ratio4", "ratio8"])
def test_head_dims_and_gqa_match_sdpa(hq, hk, d):
    run_case(9, 13, hq, hk, d, causal=d % 64 == 0, batch=1, seed=d)


def test_causal_window_equals_window_with_right_zero():
    q, k, v = make(2, 17, 23, 4, 2, 32)
    a = reference.attention(q, k, v, causal=True, window=(5, 8))
    b = reference.attention(q, k, v, window=(5, 0))
    assert torch.equal(a, b)
    assert torch.equal(reference.attention(q, k, v, causal=True),
                       reference.attention(q, k, v, causal=True, window=(-1, -1)))


def test_strided_views():
    qkv = randn((2, 11, 3, 4, 32), dtype=torch.float64)         # q, k, v interleaved: no view is contiguous
    q, k, v = qkv.unbind(2)
    assert torch.equal(reference.attention(q, k, v, causal=True),
                       reference.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))


def test_deterministic_is_accepted():
    q, k, v = make(1, 7, 9, 2, 1, 32)
    assert torch.equal(reference.attention(q, k, v, deterministic=True), reference.attention(q, k, v))


# -- rows without keys ---------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [dict(causal=True), dict(window=(0, 0)), dict(window=(-1, 3), alibi="heads")],
                         ids=["causal", "window", "right_alibi"])
def test_rows_without_keys(opts):
    sq, sk = 113, 17
    out, lse = run_case(sq, sk, 4, 2, 32, **opts)         # matches SDPA on the rows with keys
    right = 0 if opts.get("causal") else opts["window"][1]
    empty = sq - sk - right                               # queries at key positions < -right
    assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
    assert torch.isinf(lse[:, :, :empty]).all() and (lse[:, :, :empty] > 0).all()
    assert torch.isfinite(lse[:, :, empty:]).all()
    q, k, v = make(2, sq, sk, 4, 2, 32)
    out = reference.attention(q, k, v, **{key: value for key, value in opts.items() if key != "alibi"})
    dq, dk, dv = grads(out, (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :empty], torch.zeros_like(dq[:, :empty]))


def test_no_keys_and_no_queries():
    q, k, v = make(2, 5, 0, 4, 2, 64)
    out, lse = reference.attention(q, k, v, return_lse=True, alibi_slopes=torch.ones(4))
    assert torch.equal(out, torch.zeros_like(q)) and torch.equal(lse, torch.full((2, 4, 5), INF, dtype=lse.dtype))
    dq, dk, dv = grads(out, (q, k, v))
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape
    q, k, v = make(2, 0, 5, 4, 2, 64, dtype=torch.bfloat16)
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.shape == (2, 4, 0)
    assert lse.dtype == torch.float32


# -- softcap -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap,opts", [(1.5, dict()), (30.0, dict(causal=True)), (2.0, dict(alibi=True, window=(4, 2))),
                                      (5.0, dict(causal=True, alibi=True))],
                         ids=["cap1.5", "cap30_causal", "cap2_alibi_window", "cap5_causal_alibi"])
def test_softcap_matches_direct_computation(cap, opts):
    batch, sq, sk, hq, hk, d, scale = 2, 13, 19, 4, 2, 64, 0.5   # large scores: the cap bites
    q, k, v = make(batch, sq, sk, hq, hk, d, seed=3)
    slopes = torch.linspace(0.05, 0.6, hq) if opts.get("alibi") else None
    causal, window = opts.get("causal", False), opts.get("window", (-1, -1))
    out, lse = reference.attention(q, k, v, causal=causal, window=window, softcap=cap, alibi_slopes=slopes,
                                   softmax_scale=scale, return_lse=True)
    bias = None if slopes is None else alibi_bias(slopes, batch, hq, sq, sk)
    expected, expected_lse = softcap_oracle(q, k, v, cap, scale, keep_mask(sq, sk, causal, window), bias)
    assert_same(out, expected)
    assert_same(lse, expected_lse)
    assert_same(grads(out, (q, k, v)), grads(expected, (q, k, v)))
    # softcap = 0 means none
    no_cap = reference.attention(q, k, v, softmax_scale=scale, softcap=0.0)
    assert_same(no_cap, sdpa_oracle(q, k, v, keep_mask(sq, sk), scale=scale)[0])


# -- varlen --------------------------------------------------------------------------------------

def pad(x, cu, length):
    """(total, h, d) packed -> (batch, length, h, d), zero padded (differentiable)."""
    return torch.stack([F.pad(x[a:b], (0, 0, 0, 0, 0, length - (b - a))) for a, b in zip(cu, cu[1:])])


@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window=(2, 1), alibi="heads"),
                                  dict(causal=True, alibi="batch"), dict(softmax_scale=0.2, window=(-1, 0))],
                         ids=["plain", "causal", "window_alibi", "causal_alibi_batch", "scale_right0"])
def test_varlen_matches_padded_sdpa(opts):
    lens_q = [3, 0, 1, 17, 5, 1, 0, 2]
    lens_k = [4, 2, 0, 17, 1, 1, 0, 9]
    hq, hk, d = 4, 2, 40
    cu_q = [0] + torch.tensor(lens_q).cumsum(0).tolist()
    cu_k = [0] + torch.tensor(lens_k).cumsum(0).tolist()
    q, k, v = randn_list([(cu_q[-1], hq, d), (cu_k[-1], hk, d), (cu_k[-1], hk, d)], seed=5)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    batch, mq, mk = len(lens_q), max(lens_q), max(lens_k)
    alibi = opts.get("alibi")
    slopes = None if alibi is None else torch.rand((hq,) if alibi == "heads" else (batch, hq)) * 0.4
    causal, window, scale = opts.get("causal", False), opts.get("window", (-1, -1)), opts.get("softmax_scale")
    out, lse = reference.attention_varlen(
        q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32), mq, mk,
        causal=causal, window=window, softmax_scale=scale, alibi_slopes=slopes, return_lse=True)
    assert out.shape == q.shape and lse.shape == (hq, cu_q[-1]) and lse.dtype == torch.float64

    keep = torch.zeros(batch, mq, mk, dtype=torch.bool)
    bias = torch.zeros(batch, hq, mq, mk, dtype=torch.float64)
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        keep[b, :lq, :lk] = keep_mask(lq, lk, causal, window)
        if slopes is not None:
            bias[b, :, :lq, :lk] = alibi_bias(slopes[b] if slopes.dim() == 2 else slopes, 1, hq, lq, lk)[0]
    padded, padded_lse = sdpa_oracle(pad(q, cu_q, mq), pad(k, cu_k, mk), pad(v, cu_k, mk), keep, bias, scale)
    expected = torch.cat([padded[b, :lq] for b, lq in enumerate(lens_q)])
    expected_lse = torch.cat([padded_lse[b, :, :lq] for b, lq in enumerate(lens_q)], dim=1)
    assert_same(out, expected)
    assert_same(lse, expected_lse)
    assert_same(grads(out, (q, k, v)), grads(expected, (q, k, v)))
    assert torch.isinf(lse[:, cu_q[2]]).all()              # the sequence with 1 query and no keys
    assert torch.equal(out[cu_q[2]], torch.zeros_like(out[cu_q[2]]))


def test_varlen_empty_batch_and_plain_output():
    q, k, v = make(1, 4, 6, 2, 2, 32)
    cu_q = torch.tensor([0, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, 6], dtype=torch.int32)
    out = reference.attention_varlen(q[0], k[0], v[0], cu_q, cu_k, 4, 6, causal=True)
    assert torch.equal(out, reference.attention(q, k, v, causal=True)[0])
    zero = torch.zeros(1, dtype=torch.int32)
    out, lse = reference.attention_varlen(q[0, :0], k[0, :0], v[0, :0], zero, zero, 0, 0, return_lse=True)
    assert out.shape == (0, 2, 32) and lse.shape == (2, 0)


# -- low precision -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("sq,sk,causal", [(17, 113, True), (33, 33, False)])
def test_low_precision_parity(dtype, sq, sk, causal):
    hq, hk, d = 8, 2, 64
    q, k, v = make(2, sq, sk, hq, hk, d, dtype=dtype, seed=7)
    out, lse = reference.attention(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    keep = keep_mask(sq, sk, causal)
    expected, expected_lse = sdpa_oracle(q.double(), k.double(), v.double(), keep)
    # PyTorch in the same precision: SDPA for the output, logsumexp of its own scores for the lse.
    qt, kt, vt = (t.detach().transpose(1, 2) for t in (q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2)))
    torch_out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep).transpose(1, 2)
    scores = (qt @ kt.transpose(-1, -2)).float() / math.sqrt(d)
    torch_lse = torch.logsumexp(scores.masked_fill(~keep, -INF), dim=-1)
    assert_parity(out.detach(), torch_out, expected, "out")
    assert_parity(lse.detach(), torch_lse, expected_lse, "lse")
    dq, dk, dv = grads(out, (q, k, v))
    assert dq.dtype == dk.dtype == dv.dtype == dtype


# -- errors --------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    q, k, v = make(1, 4, 5, 4, 2, 32)
    with pytest.raises(ValueError, match="heads"):
        reference.attention(q, k.repeat(1, 1, 2, 1)[:, :, :3], v.repeat(1, 1, 2, 1)[:, :, :3])
    with pytest.raises(ValueError, match="head_dim"):
        reference.attention(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="batch"):
        reference.attention(q.expand(2, -1, -1, -1), k, v)
    with pytest.raises(ValueError, match="k and v"):
        reference.attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="q must have 4"):
        reference.attention(q[0], k, v)
    with pytest.raises(TypeError, match="one dtype"):
        reference.attention(q, k.float(), v)
    with pytest.raises(TypeError, match="q must be"):
        reference.attention(q.int(), k, v)
    with pytest.raises(ValueError, match="window"):
        reference.attention(q, k, v, window=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        reference.attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        reference.attention(q, k, v, alibi_slopes=torch.ones(3))
    with pytest.raises(TypeError, match="alibi_slopes"):
        reference.attention(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.float64))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    cu_k = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        reference.attention_varlen(q[0], k[0], v[0], cu.long(), cu_k, 4, 5)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        reference.attention_varlen(q[0], k[0], v[0], cu, torch.tensor([0, 6, 5], dtype=torch.int32), 4, 6)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        reference.attention_varlen(q[0], k[0], v[0], torch.tensor([0, 3], dtype=torch.int32), cu_k, 4, 5)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        reference.attention_varlen(q[0], k[0], v[0], cu, cu_k, 4, 4)
