"""Attention (issue 10, in progress): the CPU forward kernel (llmkernels.attention.forward) against the
reference (llmkernels.reference.attention, itself checked against SDPA in
test_attention_reference.py). The backward, the CUDA kernels and so the `emu`/`cuda` backends come
with the rest of the issue; until then these tests run the CPU kernel only.

Oracle: the reference on float64 inputs. Parity rule (helpers.assert_parity): the kernel's error is
at most 2x the error of the reference computed from the same low-precision inputs in float32 and
rounded to their dtype, plus a floor. LSE: the same rule against the float64 LSE (finite rows), and
exactly +inf where a query sees no key.
"""
import pytest
import torch

from llmkernels import attention
from llmkernels._ext import C
from llmkernels.reference import attention as reference

from helpers import assert_parity, randn

# (seqlen_q, seqlen_k, heads_q, heads_k, head_dim): tails of every block size, sq != sk both ways,
# head ratios 1, 4, 8, the head dims of the issue.
SHAPES = [(1, 1, 1, 1, 32), (17, 17, 4, 1, 64), (113, 17, 4, 4, 40), (17, 113, 8, 1, 80), (1, 257, 8, 2, 96),
          (65, 65, 2, 2, 128), (33, 40, 2, 1, 256), (255, 257, 2, 2, 64)]
MASKS = [dict(), dict(causal=True), dict(window=(7, -1)), dict(window=(5, 3)), dict(causal=True, window=(9, -1)),
         dict(window=(-1, 0))]


def inputs(sq, sk, hq, hk, d, dtype, *, batch=2, seed=0):
    q = randn((batch, sq, hq, d), dtype=dtype, seed=seed)
    k = randn((batch, sk, hk, d), dtype=dtype, seed=seed + 1)
    v = randn((batch, sk, hk, d), dtype=dtype, seed=seed + 2)
    return q, k, v


def check(q, k, v, name, **options):
    out, lse = attention.forward(q, k, v, **options)
    oracle, oracle_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **options)
    same_precision, same_lse = reference.attention(q, k, v, return_lse=True, **options)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_parity(out, same_precision, oracle, name)
    finite = torch.isfinite(oracle_lse)
    assert torch.equal(torch.isinf(lse), ~finite), f"{name}: +inf LSE rows differ from the oracle's"
    assert (lse[~finite] == float("inf")).all()
    assert_parity(lse[finite], same_lse[finite].float(), oracle_lse[finite], f"{name} lse")
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(shape, dtype):
    q, k, v = inputs(*shape, dtype)
    check(q, k, v, f"{shape} {dtype}")


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "none")
@pytest.mark.parametrize("shape", [(113, 17, 4, 2, 40), (17, 113, 2, 2, 64), (70, 70, 4, 1, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_masks_match_reference(shape, mask):
    q, k, v = inputs(*shape, torch.bfloat16, seed=3)
    check(q, k, v, f"{shape} {mask}", **mask)


def test_softcap_alibi_and_scale():
    q, k, v = inputs(70, 90, 4, 2, 64, torch.bfloat16, seed=5)
    slopes = torch.rand(4)
    per_batch = torch.rand(2, 4)
    check(q, k, v, "softcap", softcap=20.0)
    check(q, k, v, "alibi", alibi_slopes=slopes, causal=True)
    check(q, k, v, "alibi per batch", alibi_slopes=per_batch, window=(10, 10))
    check(q, k, v, "scale + softcap + alibi", softmax_scale=0.3, softcap=5.0, alibi_slopes=slopes)


def test_strided_views_of_a_packed_qkv():
    qkv = randn((2, 57, 3, 4, 64), dtype=torch.bfloat16, seed=7)
    q, k, v = qkv.unbind(2)                      # non-contiguous views with a shared buffer
    assert not q.is_contiguous()
    check(q, k, v, "packed qkv", causal=True)


def test_empty_key_sequence_and_fully_masked_rows():
    q, k, v = inputs(5, 0, 2, 1, 32, torch.float32)
    out, lse = attention.forward(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and (lse == float("inf")).all()
    q, k, v = inputs(40, 8, 2, 2, 32, torch.float32)
    out, lse = check(q, k, v, "causal, sq > sk", causal=True)   # the first 32 queries see no key
    assert torch.equal(out[:, :32], torch.zeros_like(out[:, :32]))


def test_varlen_matches_reference_with_empty_and_single_token_sequences():
    lengths_q, lengths_k = [0, 1, 17, 40, 1], [3, 1, 0, 55, 9]
    cu_q = torch.tensor([0] + torch.tensor(lengths_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lengths_k).cumsum(0).tolist(), dtype=torch.int32)
    q = randn((sum(lengths_q), 4, 64), dtype=torch.bfloat16, seed=11)
    k = randn((sum(lengths_k), 2, 64), dtype=torch.bfloat16, seed=12)
    v = randn((sum(lengths_k), 2, 64), dtype=torch.bfloat16, seed=13)
    for options in (dict(), dict(causal=True), dict(window=(4, 2), alibi_slopes=torch.rand(5, 4))):
        out, lse = attention.forward(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=40,
                                     max_seqlen_k=55, **options)
        oracle, oracle_lse = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, 40, 55,
                                                        return_lse=True, **options)
        same, _ = reference.attention_varlen(q, k, v, cu_q, cu_k, 40, 55, return_lse=True, **options)
        assert lse.shape == (4, sum(lengths_q))
        assert_parity(out, same, oracle, f"varlen {options}")
        finite = torch.isfinite(oracle_lse)
        assert torch.equal(torch.isinf(lse), ~finite)
        torch.testing.assert_close(lse[finite].double(), oracle_lse[finite].double(), rtol=0, atol=1e-4)


def test_bad_inputs_raise_clear_errors():
    q, k, v = inputs(9, 9, 4, 2, 64, torch.bfloat16)
    with pytest.raises(ValueError, match=r"q's heads \(4\) must be a multiple of k's heads \(3\)"):
        attention.forward(q, randn((2, 9, 3, 64), dtype=torch.bfloat16), randn((2, 9, 3, 64), dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8 up to 256; got 20"):
        attention.forward(*inputs(9, 9, 2, 2, 20, torch.bfloat16))
    with pytest.raises(ValueError, match="k must have q's head_dim 64"):
        attention.forward(q, randn((2, 9, 2, 32), dtype=torch.bfloat16), randn((2, 9, 2, 32), dtype=torch.bfloat16))
    with pytest.raises(TypeError):
        attention.forward(q, k.float(), v)
    with pytest.raises(ValueError, match="window entries must be >= -1"):
        attention.forward(q, k, v, window=(-2, 0))
    cu = torch.tensor([0, 5, 3, 9], dtype=torch.int32)
    flat = randn((9, 2, 64), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        attention.forward(flat, flat, flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=9, max_seqlen_k=9)
    good = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="more than max_seqlen_q = 4"):
        attention.forward(flat, flat, flat, cu_seqlens_q=good, cu_seqlens_k=good, max_seqlen_q=4, max_seqlen_k=9)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal the packed tokens \(9\); got 8"):
        attention.forward(flat, flat, flat, cu_seqlens_q=good, cu_seqlens_k=torch.tensor([0, 5, 8], dtype=torch.int32),
                          max_seqlen_q=9, max_seqlen_k=9)


def test_opcheck_forward():
    q, k, v = inputs(17, 23, 4, 2, 32, torch.float32)
    torch.library.opcheck(torch.ops.llmkernels.attention_forward.default,
                          (q, k, v, None, None, 0, 0, 0.2, 0.0, True, -1, -1, None))


# -- the backward (CPU kernel, through autograd) ------------------------------------------------------

def gradients(fn, q, k, v, dout, dlse, **options):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, **options)
    finite = torch.isfinite(lse)
    loss = (out.double() * dout).sum() + (lse.double().where(finite, 0) * dlse).sum()
    return torch.autograd.grad(loss, (q, k, v))


def reference_forward(q, k, v, **options):
    if options.get("cu_seqlens_q") is not None:
        cu_q, cu_k = options.pop("cu_seqlens_q"), options.pop("cu_seqlens_k")
        max_q, max_k = options.pop("max_seqlen_q"), options.pop("max_seqlen_k")
        return reference.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **options)
    return reference.attention(q, k, v, return_lse=True, **options)


def check_gradients(q, k, v, name, **options):
    out_shape = q.shape
    lse_shape = attention.forward(q, k, v, **options)[1].shape
    dout = randn(out_shape, dtype=torch.float64, seed=21)
    dlse = randn(lse_shape, dtype=torch.float64, seed=22, scale=0.5)
    ours = gradients(attention.forward, q, k, v, dout, dlse, **options)
    oracle = gradients(reference_forward, q.double(), k.double(), v.double(), dout, dlse, **dict(options))
    same = gradients(reference_forward, q, k, v, dout, dlse, **dict(options))
    for label, a, s, o in zip(("dq", "dk", "dv"), ours, same, oracle):
        assert a.dtype == q.dtype
        assert_parity(a, s, o, f"{name} {label}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(17, 17, 4, 1, 64), (113, 17, 4, 2, 40), (17, 113, 2, 2, 32), (65, 65, 8, 1, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_reference(shape, dtype):
    q, k, v = inputs(*shape, dtype, seed=4)
    check_gradients(q, k, v, f"{shape} {dtype}")


@pytest.mark.parametrize("mask", MASKS[1:], ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_backward_masks_softcap_alibi(mask):
    q, k, v = inputs(70, 90, 4, 2, 64, torch.float32, seed=6)
    check_gradients(q, k, v, f"{mask}", **mask)
    check_gradients(q, k, v, f"{mask} softcap alibi", softcap=8.0, alibi_slopes=torch.rand(4), **mask)


def test_backward_varlen_and_strided_inputs():
    lengths_q, lengths_k = [0, 1, 17, 40, 1], [3, 1, 0, 55, 9]
    cu_q = torch.tensor([0] + torch.tensor(lengths_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lengths_k).cumsum(0).tolist(), dtype=torch.int32)
    q = randn((sum(lengths_q), 4, 32), seed=14)
    k = randn((sum(lengths_k), 2, 32), seed=15)
    v = randn((sum(lengths_k), 2, 32), seed=16)
    check_gradients(q, k, v, "varlen causal", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=40, max_seqlen_k=55,
                    causal=True)
    qkv = randn((2, 33, 3, 4, 32), seed=17)
    check_gradients(*qkv.unbind(2), "packed qkv", window=(6, 2))


def test_opcheck_backward_and_compile():
    q, k, v = inputs(17, 23, 4, 2, 32, torch.float32)
    out, lse = attention.forward(q, k, v, causal=True)
    args = (randn(out.shape, seed=1), q, k, v, out, lse, None, None, None, 0, 0, 0.2, 0.0, True, -1, -1, None)
    torch.library.opcheck(torch.ops.llmkernels.attention_backward.default, args)
    torch.library.opcheck(torch.ops.llmkernels.attention_forward.default,
                          tuple(t.requires_grad_() if isinstance(t, torch.Tensor) else t
                                for t in (q.clone(), k.clone(), v.clone(), None, None, 0, 0, 0.2, 0.0, True, -1, -1,
                                          None)))

    def block(x, wq, wk, wv):
        b, s, _ = x.shape
        heads = lambda t, h: t.view(b, s, h, 16)
        return attention.attention(heads(x @ wq, 4), heads(x @ wk, 2), heads(x @ wv, 2), causal=True).sum()

    x = randn((2, 19, 32), seed=2)
    weights = [randn((32, n), seed=3 + i, scale=0.2).requires_grad_() for i, n in enumerate((64, 32, 32))]
    eager = torch.autograd.grad(block(x, *weights), weights)
    compiled = torch.autograd.grad(torch.compile(block, fullgraph=True)(x, *weights), weights)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_tensors_are_refused_until_the_cuda_kernel_exists():
    q = torch.randn(1, 4, 2, 32, device="cuda")
    with pytest.raises(RuntimeError, match="CPU kernel only so far"):
        attention.attention(q, q, q)
