"""Attention: the kernels (llmkernels.attention) against the reference (llmkernels.reference.attention,
itself checked against SDPA in test_attention_reference.py), forward and backward, on every backend
of the `device` fixture: the CPU kernels, the CUDA kernels under the emulator on CPU tensors (`emu`,
bf16/fp16 only, as on a GPU; small shapes that still cover every code path), and on a GPU.

Oracle: the reference on float64 inputs. Parity rule (helpers.assert_parity): the kernel's error is
at most 2x the error of PyTorch's computation from the same low-precision inputs, plus a floor. For
the CPU kernel (float32 throughout) that baseline is the reference computed in float32 and rounded
once; the CUDA kernels round P and dS to bf16/fp16 for the tensor cores (as every flash kernel
does), and their baseline is the reference computed in that dtype (`upcast=False`), DESIGN.md's "the
same computation done by PyTorch in the same low precision" and flash-attn's own test rule. LSE: the same rule against the float64 LSE (finite rows), and
exactly +inf where a query sees no key.
"""
import contextlib

import pytest
import torch

import llmkernels
from llmkernels import _attention as attention
from llmkernels._ext import C
from llmkernels.reference import attention as reference

from helpers import assert_parity, generator, poisoned, randn

# (seqlen_q, seqlen_k, heads_q, heads_k, head_dim): tails of every block size, sq != sk both ways,
# head ratios 1, 4, 8, the head dims of the issue, and 8 and 136 (the smallest accepted, and one that
# pads to 256 and leaves the second column half of the dk/dv blocks nearly empty).
SHAPES = [(1, 1, 1, 1, 32), (17, 17, 4, 1, 64), (113, 17, 4, 4, 40), (17, 113, 8, 1, 80), (1, 257, 8, 2, 96),
          (65, 65, 2, 2, 128), (33, 40, 2, 1, 256), (255, 257, 2, 2, 64), (9, 12, 2, 1, 8), (20, 30, 2, 2, 136)]
MASKS = [dict(), dict(causal=True), dict(window=(7, -1)), dict(window=(5, 3)), dict(causal=True, window=(9, -1)),
         dict(window=(-1, 0))]


def rand(shape, *, seed, device):
    """Seeded uniform [0, 1) values (ALiBi slopes)."""
    return torch.rand(shape, generator=generator(seed)).to(device)


def cuda_kernels(device) -> bool:
    """Whether `device` runs the CUDA kernels (on a GPU, or emulated)."""
    return torch.device(device).type == "cuda" or llmkernels.emulator.enabled()


def kernel_dtype(device, cpu_dtype=torch.float32):
    """The CUDA kernels take bf16/fp16 only; the CPU kernel is tested in fp32 where a test picks one."""
    return torch.bfloat16 if cuda_kernels(device) else cpu_dtype


def inputs(sq, sk, hq, hk, d, dtype, *, batch=2, seed=0, device="cpu"):
    q = randn((batch, sq, hq, d), dtype=dtype, seed=seed, device=device)
    k = randn((batch, sk, hk, d), dtype=dtype, seed=seed + 1, device=device)
    v = randn((batch, sk, hk, d), dtype=dtype, seed=seed + 2, device=device)
    return q, k, v


def check(q, k, v, name, **options):
    """The forward on q's device against the float64 reference (on the CPU) under the parity rule."""
    out, lse = attention.forward(q, k, v, **options)
    upcast = not cuda_kernels(q.device)
    out, lse = out.cpu(), lse.cpu()
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    options = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    options.pop("deterministic", None)
    oracle, oracle_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **options)
    same_lse = reference.attention(q, k, v, return_lse=True, **options)[1]   # the kernels' lse is float32
    same_precision = reference.attention(q, k, v, upcast=upcast, **options)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_parity(out, same_precision, oracle, name)
    finite = torch.isfinite(oracle_lse)
    assert torch.equal(torch.isinf(lse), ~finite), f"{name}: +inf LSE rows differ from the oracle's"
    assert (lse[~finite] == float("inf")).all()
    assert_parity(lse[finite], same_lse[finite].float(), oracle_lse[finite], f"{name} lse")
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_reference(shape, dtype, device):
    q, k, v = inputs(*shape, dtype, device=device)
    if dtype == torch.float32 and cuda_kernels(device):
        with pytest.raises(TypeError, match="unsupported dtype float32"):
            attention.forward(q, k, v)
        return
    check(q, k, v, f"{shape} {dtype}")


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "none")
@pytest.mark.parametrize("shape", [(113, 17, 4, 2, 40), (17, 113, 2, 2, 64), (70, 70, 4, 1, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_masks_match_reference(shape, mask, device):
    q, k, v = inputs(*shape, torch.bfloat16, seed=3, device=device)
    check(q, k, v, f"{shape} {mask}", **mask)


def test_softcap_alibi_and_scale(device):
    q, k, v = inputs(70, 90, 4, 2, 64, torch.bfloat16, seed=5, device=device)
    slopes = rand((4,), seed=31, device=device)
    per_batch = rand((2, 4), seed=32, device=device)
    check(q, k, v, "softcap", softcap=20.0)
    check(q, k, v, "alibi", alibi_slopes=slopes, causal=True)
    check(q, k, v, "alibi per batch", alibi_slopes=per_batch, window=(10, 10))
    check(q, k, v, "scale + softcap + alibi", softmax_scale=0.3, softcap=5.0, alibi_slopes=slopes)


def test_zero_and_subnormal_scales(device):
    """softmax_scale 0 (every score 0: lse = ln(keys), uniform weights) and a subnormal one: the CUDA
    epilogue's change of base from log2 units once divided 0 by 0 here, a NaN lse and NaN gradients."""
    q, k, v = inputs(21, 30, 2, 1, 64, kernel_dtype(device), seed=9, device=device)
    for scale in (0.0, 1e-45):
        check(q, k, v, f"scale {scale}", softmax_scale=scale)
        check(q, k, v, f"scale {scale} causal", softmax_scale=scale, causal=True)
        check_gradients(q, k, v, f"scale {scale}", softmax_scale=scale)


def test_strided_views_of_a_packed_qkv(device):
    qkv = randn((2, 57, 3, 4, 64), dtype=torch.bfloat16, seed=7, device=device)
    q, k, v = qkv.unbind(2)                      # non-contiguous views with a shared buffer
    assert not q.is_contiguous()
    check(q, k, v, "packed qkv", causal=True)
    sliced = randn((2, 33, 2, 72), dtype=torch.bfloat16, seed=8, device=device)[..., 4:68]  # 8-byte offset
    check(sliced, sliced, sliced, "misaligned slice (copied)", window=(3, 3))


def test_empty_key_sequence_and_fully_masked_rows(device):
    dtype = kernel_dtype(device)
    q, k, v = inputs(5, 0, 2, 1, 32, dtype, device=device)
    out, lse = attention.forward(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and (lse == float("inf")).all()
    q, k, v = inputs(40, 8, 2, 2, 32, dtype, device=device)
    out, lse = check(q, k, v, "causal, sq > sk", causal=True)   # the first 32 queries see no key
    assert torch.equal(out[:, :32], torch.zeros_like(out[:, :32]))


def varlen_inputs(device, dtype=torch.bfloat16, head_dim=64, seed=11):
    lengths_q, lengths_k = [0, 1, 17, 70, 1], [3, 1, 0, 85, 9]
    cu_q = torch.tensor([0] + torch.tensor(lengths_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lengths_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = randn((sum(lengths_q), 4, head_dim), dtype=dtype, seed=seed, device=device)
    k = randn((sum(lengths_k), 2, head_dim), dtype=dtype, seed=seed + 1, device=device)
    v = randn((sum(lengths_k), 2, head_dim), dtype=dtype, seed=seed + 2, device=device)
    return q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)


def test_varlen_matches_reference_with_empty_and_single_token_sequences(device):
    q, k, v, cu_q, cu_k, max_q, max_k = varlen_inputs(device)
    for options in (dict(), dict(causal=True), dict(window=(4, 2), alibi_slopes=rand((5, 4), seed=33, device=device))):
        out, lse = attention.forward(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                     max_seqlen_k=max_k, **options)
        out, lse = out.cpu(), lse.cpu()
        # (new names: the next options run the kernel on the device tensors again)
        qc, kc, vc, cu_qc, cu_kc = (t.cpu() for t in (q, k, v, cu_q, cu_k))
        options = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in options.items()}
        oracle, oracle_lse = reference.attention_varlen(qc.double(), kc.double(), vc.double(), cu_qc, cu_kc, max_q,
                                                        max_k, return_lse=True, **options)
        same = reference.attention_varlen(qc, kc, vc, cu_qc, cu_kc, max_q, max_k, upcast=not cuda_kernels(device),
                                          **options)
        assert lse.shape == (4, q.shape[0])
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
    with pytest.raises(ValueError, match="k must have q's batch 2"):
        attention.forward(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="window entries must be >= -1"):
        attention.forward(q, k, v, window=(-2, 0))
    cu = torch.tensor([0, 5, 3, 9], dtype=torch.int32)
    flat = randn((9, 2, 64), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        attention.forward(flat, flat, flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=9, max_seqlen_k=9)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        attention.forward(flat, flat, flat, cu_seqlens_q=cu.long(), cu_seqlens_k=cu.long(), max_seqlen_q=9,
                          max_seqlen_k=9)
    good = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="more than max_seqlen_q = 4"):
        attention.forward(flat, flat, flat, cu_seqlens_q=good, cu_seqlens_k=good, max_seqlen_q=4, max_seqlen_k=9)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal the packed tokens \(9\); got 8"):
        attention.forward(flat, flat, flat, cu_seqlens_q=good, cu_seqlens_k=torch.tensor([0, 5, 8], dtype=torch.int32),
                          max_seqlen_q=9, max_seqlen_k=9)


def sdpa_oracle(q, k, v, *, causal=False, window=(-1, -1), alibi_slopes=None):
    """float64 SDPA with the masks and the ALiBi bias built here, independently of the reference:
    (batch, seqlen, heads, head_dim) in and out, GQA by repeating k and v."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
    sq, sk = q.shape[2], k.shape[2]
    position = torch.arange(sq)[:, None] + (sk - sq)        # query i's key position (bottom-right)
    key = torch.arange(sk)[None, :]
    left, right = window
    right = 0 if causal else right
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        keep &= key >= position - left
    if right >= 0:
        keep &= key <= position + right
    bias = torch.zeros(sq, sk, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    if alibi_slopes is not None:
        bias = bias - alibi_slopes.double()[:, None, None] * (position - key).abs()
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)


@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(20, 5)), dict(alibi=True, causal=True)],
                         ids=["causal", "window", "alibi"])
def test_forward_matches_sdpa(options, device):
    """An oracle independent of llmkernels.reference: float64 SDPA (every query sees a key here, so
    no row is fully masked)."""
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = rand((4,), seed=35, device=device)
    q, k, v = inputs(75, 90, 4, 2, 64, kernel_dtype(device), seed=36, device=device)
    out = llmkernels.attention(q, k, v, **options).cpu()
    cpu_options = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    oracle = sdpa_oracle(q.cpu(), k.cpu(), v.cpu(), **cpu_options)
    same = reference.attention(q.cpu(), k.cpu(), v.cpu(), upcast=not cuda_kernels(device), **cpu_options)
    assert_parity(out, same, oracle, f"against SDPA {options}")


@pytest.mark.cuda
def test_tensors_on_different_devices_are_refused():
    q = randn((1, 9, 2, 32), dtype=torch.bfloat16, device="cuda")
    k = randn((1, 9, 2, 32), dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="device"):
        llmkernels.attention(q, k, k.cuda())


@pytest.mark.parametrize("seqlen", [1000, 4097])
def test_long_sequences(seqlen, device):
    """The issue's long tails: 1000 and 4097 tokens (one past a multiple of every tile), causal,
    forward and gradients. (Under the emulator, 4097 is forward only: its backward takes minutes.)"""
    q, k, v = inputs(seqlen, seqlen, 2, 1, 32, kernel_dtype(device), batch=1, seed=seqlen, device=device)
    check(q, k, v, f"seqlen {seqlen}", causal=True)
    if seqlen < 4000 or not llmkernels.emulator.enabled():
        check_gradients(q, k, v, f"seqlen {seqlen}", causal=True)


def test_public_api_is_flash_attn_shaped():
    """llmkernels.attention and attention_varlen are the functions (flash-attn's names), and the
    keyword options are keyword-only."""
    assert llmkernels.attention is attention.attention and llmkernels.attention_varlen is attention.attention_varlen
    q, k, v = inputs(9, 9, 2, 1, 32, torch.float32)
    out, lse = llmkernels.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 9)
    with pytest.raises(TypeError):
        llmkernels.attention(q, k, v, True)


def test_opcheck_forward():
    q, k, v = inputs(17, 23, 4, 2, 32, torch.float32)
    torch.library.opcheck(torch.ops.llmkernels.attention_forward.default,
                          (q, k, v, None, None, 0, 0, 0.2, 0.0, True, -1, -1, None, False))


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
    """dq, dk, dv through autograd (with a gradient through the LSE too) on q's device, against the
    float64 reference's (on the CPU) under the parity rule."""
    device = q.device
    lse_shape = attention.forward(q, k, v, **options)[1].shape
    dout = randn(q.shape, dtype=torch.float64, seed=21)
    dlse = randn(lse_shape, dtype=torch.float64, seed=22, scale=0.5)
    ours = gradients(attention.forward, q, k, v, dout.to(device), dlse.to(device), **options)
    upcast = not cuda_kernels(device)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    options = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    options.pop("deterministic", None)
    oracle = gradients(reference_forward, q.double(), k.double(), v.double(), dout, dlse, **dict(options))
    same = gradients(reference_forward, q, k, v, dout, dlse, upcast=upcast, **dict(options))
    for label, a, s, o in zip(("dq", "dk", "dv"), ours, same, oracle):
        assert a.dtype == q.dtype
        assert_parity(a.cpu(), s, o, f"{name} {label}")
    return ours


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(17, 17, 4, 1, 64), (113, 17, 4, 2, 40), (17, 113, 2, 2, 32), (65, 65, 8, 1, 128),
                                   (1, 70, 2, 1, 256), (40, 33, 2, 2, 96), (9, 12, 2, 1, 8), (20, 30, 2, 2, 136)],
                         ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_reference(shape, dtype, deterministic, device):
    q, k, v = inputs(*shape, dtype, seed=4, device=device)
    if dtype == torch.float32 and cuda_kernels(device):
        return  # refused with a TypeError by the forward (test_forward_matches_reference)
    check_gradients(q, k, v, f"{shape} {dtype}", deterministic=deterministic)


@pytest.mark.parametrize("mask", MASKS[1:], ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_backward_masks_softcap_alibi(mask, device):
    q, k, v = inputs(70, 90, 4, 2, 64, kernel_dtype(device), seed=6, device=device)
    check_gradients(q, k, v, f"{mask}", **mask)
    check_gradients(q, k, v, f"{mask} softcap alibi deterministic", softcap=8.0,
                    alibi_slopes=rand((4,), seed=34, device=device), deterministic=True, **mask)


def test_backward_varlen_and_strided_inputs(device):
    q, k, v, cu_q, cu_k, max_q, max_k = varlen_inputs(device, kernel_dtype(device), head_dim=32, seed=14)
    for deterministic in (False, True):
        check_gradients(q, k, v, f"varlen causal deterministic={deterministic}", cu_seqlens_q=cu_q,
                        cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, causal=True,
                        deterministic=deterministic)
    qkv = randn((2, 33, 3, 4, 32), dtype=kernel_dtype(device), seed=17, device=device)
    check_gradients(*qkv.unbind(2), "packed qkv", window=(6, 2))


def test_deterministic_backward_is_reproducible_bit_for_bit(device):
    """deterministic=True: identical gradients across runs (on a GPU, and under the emulator with
    shuffled schedules, whose blocks also run in parallel); the atomic path agrees to rounding."""
    q, k, v = inputs(130, 140, 4, 1, 64, kernel_dtype(device), seed=9, device=device)
    first = check_gradients(q, k, v, "deterministic", causal=True, deterministic=True)
    for seed in (1, 2):
        with contextlib.ExitStack() as stack:
            if llmkernels.emulator.enabled():
                stack.enter_context(llmkernels.emulator.emulate(schedule="shuffled", seed=seed))
            again = check_gradients(q, k, v, "deterministic again", causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_outputs_and_gradients_are_fully_written(device):
    """The native entry points write every element of poisoned (NaN) outputs, for the shapes whose
    tiles are partial and whose rows see no key."""
    dtype = kernel_dtype(device)
    q, k, v = inputs(70, 20, 4, 2, 40, dtype, seed=12, device=device)
    out, lse = poisoned(q.shape, dtype=dtype, device=device), poisoned((2, 4, 70), device=device)
    stream = 0 if device.type == "cpu" else torch.cuda.current_stream().cuda_stream
    dl = torch.utils.dlpack.to_dlpack
    C.attention_forward(dl(q), dl(k), dl(v), None, None, 0, 0, 0.2, 0.0, True, -1, -1, None, False, dl(out), dl(lse),
                        stream)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (lse[:, :, :50] == float("inf")).all()   # causal with sq > sk: 50 queries see no key
    dout = randn(q.shape, dtype=dtype, seed=13, device=device)
    for deterministic in (False, True):
        grads = [poisoned(t.shape, dtype=dtype, device=device) for t in (q, k, v)]
        uses_workspaces = cuda_kernels(device)
        delta = poisoned(lse.shape if uses_workspaces else (0,), device=device)
        dq_accum = (torch.zeros(q.shape, device=device) if uses_workspaces and not deterministic
                    else torch.empty(0, device=device))
        C.attention_backward(dl(dout), dl(q), dl(k), dl(v), dl(out), dl(lse), None, None, None, 0, 0, 0.2, 0.0, True,
                             -1, -1, None, deterministic, *[dl(g) for g in grads], dl(delta), dl(dq_accum), stream)
        for g in grads:
            assert not g.isnan().any()
        assert (grads[0][:, :50] == 0).all()


@pytest.mark.emu
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_emulated_kernels_are_conflict_free_and_schedule_independent(head_dim):
    """Every CUDA attention kernel of one head-dim path under the emulator: no emulator check fires,
    zero bank conflicts, and a shuffled schedule gives the same bits (the forward and the
    deterministic backward; the atomic dq adds in an order that depends on the schedule)."""
    q, k, v = inputs(70, 75, 2, 1, head_dim, torch.float16, seed=head_dim)
    dout = randn(q.shape, dtype=torch.float16, seed=3)

    def run(**schedule):
        with llmkernels.emulator.emulate(**schedule):
            results = []
            for deterministic in (False, True):
                x = [t.clone().requires_grad_() for t in (q, k, v)]
                out = llmkernels.attention(*x, causal=True, deterministic=deterministic)
                results += [out, *torch.autograd.grad(out, x, dout)]
            return results

    llmkernels.emulator.reset_report()
    ordered = run()
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    assert set(reports) == {"attention forward", "attention backward prologue", "attention backward dk dv",
                            "attention backward dq", "attention backward dq convert"}
    for name, report in reports.items():
        assert report["bank_conflicts_by_site"] == {}, (name, report["bank_conflicts_by_site"])
        assert report["shared_wavefronts"] == report["shared_ideal_wavefronts"], name
    shuffled = run(schedule="shuffled", seed=head_dim)
    deterministic_parts = [0, 4, 5, 6, 7]   # forward (twice) and the deterministic gradients
    for i in deterministic_parts:
        assert torch.equal(ordered[i], shuffled[i]), i
    for i in (1, 2, 3):
        torch.testing.assert_close(ordered[i], shuffled[i], rtol=0, atol=2e-3)


@pytest.mark.cuda
def test_cuda_graph_capture_replays_forward_and_backward():
    q, k, v = inputs(100, 100, 4, 2, 64, torch.bfloat16, seed=5, device="cuda")
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = randn(q.shape, dtype=torch.bfloat16, seed=6, device="cuda")

    def step():
        out = llmkernels.attention(*x, causal=True)
        return [out, *torch.autograd.grad(out, x, dout)]

    # Detached, so that no eager autograd graph outlives its step: one kept alive keeps the inputs'
    # AccumulateGrad nodes from the default stream, which the captured backward must then sync with
    # ("operation would make the legacy stream depend on a capturing blocking stream", H200 2026-11-26).
    eager = [t.detach() for t in step()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)


def test_opcheck_backward_and_compile():
    q, k, v = inputs(17, 23, 4, 2, 32, torch.float32)
    out, lse = attention.forward(q, k, v, causal=True)
    args = (randn(out.shape, seed=1), q, k, v, out, lse, None, None, None, 0, 0, 0.2, 0.0, True, -1, -1, None, False)
    torch.library.opcheck(torch.ops.llmkernels.attention_backward.default, args)
    torch.library.opcheck(torch.ops.llmkernels.attention_forward.default,
                          tuple(t.requires_grad_() if isinstance(t, torch.Tensor) else t
                                for t in (q.clone(), k.clone(), v.clone(), None, None, 0, 0, 0.2, 0.0, True, -1, -1,
                                          None, False)))

    def block(x, wq, wk, wv):
        b, s, _ = x.shape
        heads = lambda t, h: t.view(b, s, h, 16)
        return llmkernels.attention(heads(x @ wq, 4), heads(x @ wk, 2), heads(x @ wv, 2), causal=True).sum()

    x = randn((2, 19, 32), seed=2)
    weights = [randn((32, n), seed=3 + i, scale=0.2).requires_grad_() for i, n in enumerate((64, 32, 32))]
    eager = torch.autograd.grad(block(x, *weights), weights)
    compiled = torch.autograd.grad(torch.compile(block, fullgraph=True)(x, *weights), weights)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
