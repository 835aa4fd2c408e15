"""LoRA-fused matmul (issue 13, in progress): one adapter's forward (CPU, the CUDA kernels emulated,
CUDA) against llmkernels.reference.lora.lora_linear under the parity rule (the float64 reference as
the oracle, the PEFT composition in x's dtype as the baseline)."""
import dataclasses

import pytest
import torch

import llmkernels
from llmkernels import lora, quant
from llmkernels.reference import lora as reference

from helpers import assert_parity, generator, randn


def lora_case(m, n, k, rank, dtype, device, seed, bias=True):
    g = generator(seed)
    x = randn((m, k), dtype=dtype, seed=seed)
    weight = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    lora_a = (torch.randn(rank, k, generator=g) * k ** -0.5).to(dtype)
    lora_b = (torch.randn(n, rank, generator=g) * rank ** -0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return [t if t is None else t.to(device) for t in (x, weight, lora_a, lora_b, b)]


def check_lora(x, weight, lora_a, lora_b, bias, scale, name):
    out = lora.lora_linear(x, weight, lora_a, lora_b, scale, bias=bias)
    args = [t if t is None else t.cpu() for t in (x, weight, lora_a, lora_b, bias)]
    oracle = reference.lora_linear(*args[:4], scale, bias=args[4], compute_dtype=torch.float64,
                                   out_dtype=torch.float64)
    same = reference.lora_linear(*args[:4], scale, bias=args[4], upcast=False)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], weight.shape[0]), name
    assert_parity(out.cpu(), same, oracle, name)


@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("m", [1, 37, 130])
def test_lora_linear_matches_the_reference(device, rank, m):
    """Ranks 1 (padded to 8 columns), 8, 16, 64; M = 1 (split-K on CUDA), odd M, more than one row tile;
    N and K multiples of 8 and of nothing larger; with a bias."""
    case = lora_case(m, 40, 72, rank, torch.bfloat16, device, seed=rank + m)
    check_lora(*case, 2.0 / rank, f"M={m} r={rank}")


def test_lora_linear_fp16_without_bias_and_a_strided_x(device):
    x, weight, lora_a, lora_b, _ = lora_case(19, 24, 200, 16, torch.float16, device, seed=3, bias=False)
    wide = torch.zeros(19, 208, dtype=torch.float16, device=x.device)
    wide[:, :200] = x
    check_lora(wide[:, :200], weight, lora_a, lora_b, None, 0.5, "fp16, strided x")


def test_lora_linear_float32_on_the_cpu():
    case = lora_case(9, 16, 24, 4, torch.float32, "cpu", seed=4)
    check_lora(*case, 1.5, "float32")


def check_lora_grads(x, weight, lora_a, lora_b, bias, scale, name):
    """Gradients of x, lora_a, lora_b and bias for a random dy against the reference's autograd in
    float64 (the oracle) and in x's dtype (the PEFT composition: the baseline)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b, bias)]
    out = lora.lora_linear(leaves[0], weight, leaves[1], leaves[2], scale, bias=leaves[3])
    dy = randn(out.shape, dtype=out.dtype, seed=out.shape[0] + 50).to(out.device)
    grads = torch.autograd.grad(out, leaves, dy)

    def reference_grads(dtype, upcast):
        ref = [t.detach().cpu().to(dtype).requires_grad_() for t in (x, lora_a, lora_b, bias)]
        y = reference.lora_linear(ref[0], weight.cpu().to(dtype), ref[1], ref[2], scale, bias=ref[3], upcast=upcast)
        return torch.autograd.grad(y, ref, dy.cpu().to(dtype))

    for label, got, leaf, same, oracle in zip(("dx", "d lora_a", "d lora_b", "d bias"), grads, leaves,
                                              reference_grads(x.dtype, False), reference_grads(torch.float64, True)):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, f"{name} {label}"
        assert_parity(got.cpu(), same, oracle, f"{name} {label}")


@pytest.mark.parametrize("rank", [1, 16, 64])
@pytest.mark.parametrize("m", [1, 37])
def test_lora_linear_gradients_match_the_reference(device, rank, m):
    case = lora_case(m, 40, 72, rank, torch.bfloat16, device, seed=rank + m + 100)
    check_lora_grads(*case, 2.0 / rank, f"M={m} r={rank}")


def test_lora_linear_gradients_of_the_adapter_only(device):
    """A frozen input (no dx: the shrink of dy alone) and no bias."""
    x, weight, lora_a, lora_b, _ = lora_case(21, 24, 40, 8, torch.bfloat16, device, seed=9, bias=False)
    a, b = lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()
    out = lora.lora_linear(x, weight, a, b, 0.5)
    grads = torch.autograd.grad(out.float().sum(), [a, b])
    ref = [t.detach().cpu().double().requires_grad_() for t in (lora_a, lora_b)]
    y = reference.lora_linear(x.cpu().double(), weight.cpu().double(), *ref, 0.5)
    expected = torch.autograd.grad(y.sum(), ref)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.cpu().double(), want, rtol=2 ** -6, atol=2 ** -6 * float(want.abs().max()))


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_lora_linear_dropout_forward_and_gradients(device, dropout_p):
    """LoRA's input dropout: the reference's Philox mask for the same seed (a seed past 2^63 included),
    in the forward and regenerated in the backward (dx's masked u A term and dA), under the parity rule."""
    x, weight, lora_a, lora_b, bias = lora_case(37, 40, 72, 16, torch.bfloat16, device, seed=11)
    seed = 2 ** 63 + 12345
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b, bias)]
    out = lora.lora_linear(leaves[0], weight, leaves[1], leaves[2], 0.5, bias=leaves[3], dropout_p=dropout_p,
                           seed=seed)
    dy = randn(out.shape, dtype=out.dtype, seed=13).to(out.device)
    grads = torch.autograd.grad(out, leaves, dy)

    def run(dtype, upcast):
        ref = [t.detach().cpu().to(dtype).requires_grad_() for t in (x, lora_a, lora_b, bias)]
        y = reference.lora_linear(ref[0], weight.cpu().to(dtype), ref[1], ref[2], 0.5, bias=ref[3],
                                  dropout_p=dropout_p, seed=seed, upcast=upcast)
        return (y,) + torch.autograd.grad(y, ref, dy.cpu().to(dtype))

    for label, got, same, oracle in zip(("out", "dx", "d lora_a", "d lora_b", "d bias"), (out,) + grads,
                                        run(x.dtype, False), run(torch.float64, True)):
        assert_parity(got.detach().cpu(), same.detach(), oracle.detach(), f"p={dropout_p} {label}")


def test_dropout_kernel_is_the_reference_mask(device):
    """The dropout op alone: exactly the reference's mask (zeros where dropped), kept values x / (1 - p)
    rounded once; other seeds give other masks."""
    x = randn((33, 40), dtype=torch.bfloat16, seed=14).to(device) + 3   # (no zeros in x)
    p = 0.3
    threshold = reference.dropout_threshold(p)
    out = lora._dropout(x, (7, threshold, 1 / (1 - p)))
    keep = reference.dropout_keep(7, 33, 40, p)
    assert torch.equal(out.cpu() != 0, keep)
    assert torch.equal(out.cpu()[keep], (x.cpu().float()[keep] / (1 - p)).bfloat16())
    assert not torch.equal(lora._dropout(x, (8, threshold, 1 / (1 - p))).cpu() != 0, keep)


def test_lora_linear_refuses_bad_inputs():
    x, weight, lora_a, lora_b, bias = lora_case(4, 16, 24, 8, torch.bfloat16, "cpu", seed=5)
    with pytest.raises(ValueError, match=r"lora_b must be \(16, 8\) \(adapters, weight's rows N, lora_a's rank r\)"):
        lora.lora_linear(x, weight, lora_a, lora_b[:, :4], 1.0)
    with pytest.raises(ValueError, match=r"lora_a must end in \(r, K = 24\)"):
        lora.lora_linear(x, weight, lora_a[:, :16], lora_b, 1.0)
    with pytest.raises(TypeError, match="lora_a must have x's dtype"):
        lora.lora_linear(x, weight, lora_a.float(), lora_b, 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        lora.lora_linear(x, weight, lora_a, lora_b, float("inf"))
    with pytest.raises(ValueError, match=r"bias must be a \(16,\) tensor"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, bias=bias[:8])
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, dropout_p=0.1, seed=1.5)
    with pytest.raises(ValueError, match="weight must not require grad"):
        lora.lora_linear(x, weight.requires_grad_(), lora_a, lora_b, 1.0)


@pytest.mark.emu
def test_emulated_lora_launches_two_kernels_without_bank_conflicts():
    case = lora_case(37, 40, 72, 16, torch.bfloat16, "cpu", seed=6)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate(schedule="shuffled", seed=3):
        lora.lora_linear(*case[:4], 0.25, bias=case[4])
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    assert {name: r["launches"] for name, r in reports.items()} == {"lora shrink": 1, "lora fused": 1}
    leaves = [t.clone().requires_grad_() for t in (case[0], case[2], case[3], case[4])]
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate(schedule="shuffled", seed=4):
        out = lora.lora_linear(leaves[0], case[1], leaves[1], leaves[2], 0.25, bias=leaves[3])
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    assert {name: r["launches"] for name, r in reports.items()} == {
        "lora shrink": 1, "lora fused": 1, "lora shrink (transposed)": 1, "lora fused (transposed)": 1}
    for name, r in reports.items():
        assert r["bank_conflicts_by_site"] == {}, name


def test_opcheck_lora_linear():
    x, weight, lora_a, lora_b, bias = lora_case(5, 16, 24, 8, torch.bfloat16, "cpu", seed=7)
    lora_a, lora_b = lora_a[None, None], lora_b[None]
    for transposed, first in ((False, x), (True, randn((5, 16), dtype=torch.bfloat16, seed=8))):
        torch.library.opcheck(torch.ops.llmkernels.lora_linear.default,
                              (first, None, weight, lora_a, lora_b, 0.5, None, None if transposed else bias.float(),
                               None, None, None, [16], None, None, 0, transposed))
    torch.library.opcheck(torch.ops.llmkernels.lora_dropout.default, (x, 3, 2 ** 31, 2.0))


def test_compile_of_a_training_step():
    """The forward compiled with no graph break, its backward traced by AOTAutograd: gradients under
    the parity rule."""
    x, weight, lora_a, lora_b, bias = lora_case(9, 16, 24, 8, torch.bfloat16, "cpu", seed=10)
    leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b, bias)]
    loss = torch.compile(lambda x, a, b, c: lora.lora_linear(x, weight, a, b, 0.5, bias=c).float().sum(),
                         fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)

    def reference_grads(dtype, upcast):
        ref = [t.detach().to(dtype).requires_grad_() for t in (x, lora_a, lora_b, bias)]
        y = reference.lora_linear(ref[0], weight.to(dtype), ref[1], ref[2], 0.5, bias=ref[3], upcast=upcast)
        return torch.autograd.grad(y.sum(), ref)   # (dy = 1 everywhere, as the compiled loss's)

    for label, got, same, oracle in zip(("dx", "d lora_a", "d lora_b", "d bias"), grads,
                                        reference_grads(torch.bfloat16, False), reference_grads(torch.float64, True)):
        assert_parity(got, same, oracle, f"compiled {label}")


# -- multi-adapter serving and fused-projection slices ---------------------------------------------

def adapters_case(m, n, k, rank, adapters, n_slices, device, seed, dtype=torch.bfloat16):
    """x, weight, lora_a (L, S, r, K) (S dropped when n_slices is None), lora_b (L, N, r), bias."""
    g = generator(seed)
    x = randn((m, k), dtype=dtype, seed=seed)
    weight = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    shape_a = (adapters,) + ((n_slices,) if n_slices else ()) + (rank, k)
    lora_a = (torch.randn(shape_a, generator=g) * k ** -0.5).to(dtype)
    lora_b = (torch.randn(adapters, n, rank, generator=g) * rank ** -0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return [t.to(device) for t in (x, weight, lora_a, lora_b, bias)]


def check_multi(x, weight, lora_a, lora_b, scale, name, **kwargs):
    """lora_linear against the reference (float64 oracle, the PEFT composition in x's dtype as the
    baseline) with the same keyword arguments (adapter_ids, ranks, slices, bias, dropout)."""
    with torch.no_grad():
        out = lora.lora_linear(x, weight, lora_a, lora_b, scale, **kwargs)
    cpu = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    args = [t.to("cpu") for t in (x, weight, lora_a, lora_b)]   # (an Int4Weight has .to too)
    scale = scale.cpu() if isinstance(scale, torch.Tensor) else scale
    oracle = reference.lora_linear(*args, scale, compute_dtype=torch.float64, out_dtype=torch.float64, **cpu)
    same = reference.lora_linear(*args, scale, upcast=False, **cpu)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], weight.shape[0]), name
    assert_parity(out.cpu(), same, oracle, name)
    return out


def unsorted_ids(m, adapters, seed, none_every=5):
    """Row m's adapter: a seeded permutation of the adapters repeated, every none_every-th row -1."""
    ids = torch.randint(0, adapters, (m,), generator=generator(seed), dtype=torch.int32)
    ids[::none_every] = -1
    return ids


@pytest.mark.parametrize("m", [1, 13, 37, 130])
def test_multi_adapter_rows_pick_their_adapter(device, m):
    """Unsorted adapter ids with -1 rows; M = 1 and 13 (the small tiling with split-K on CUDA), 37 and
    130 (medium tiles, several row tiles, each with several adapters); per-adapter scales."""
    x, weight, lora_a, lora_b, bias = adapters_case(m, 40, 72, 16, 5, None, device, seed=m + 200)
    ids = unsorted_ids(m, 5, seed=m).to(device)
    scale = torch.tensor([0.5, 1.0, 0.25, 2.0, 0.125], device=device)
    out = check_multi(x, weight, lora_a, lora_b, scale, f"M={m}", adapter_ids=ids, bias=bias)
    if m > 1:   # a -1 row is the base layer alone; a row's output depends only on its own adapter
        none = ids.cpu() == -1
        base = torch.nn.functional.linear(x.cpu().float(), weight.cpu().float(), bias.cpu().float())
        torch.testing.assert_close(out.cpu()[none].float(), base[none], rtol=2 ** -7, atol=2 ** -7)


def test_multi_adapter_large_tiles(device):
    """N = 16896 (132 column tiles of 128): the CUDA kernel's large tiling, its adapter lists per 128
    rows (two row tiles)."""
    x, weight, lora_a, lora_b, bias = adapters_case(150, 16896, 16, 8, 3, None, device, seed=24)
    check_multi(x, weight, lora_a, lora_b, 0.5, "large tiles", adapter_ids=unsorted_ids(150, 3, 25).to(device),
                bias=bias)


def test_multi_adapter_mixed_ranks_never_read_the_padding(device):
    """ranks [16, 5, 0, 12] of a padded r = 16 (5 and 12: chunks across the rank's end; 0: the base
    alone), NaN in every padded row of A and column of B: nothing past an adapter's rank is read."""
    x, weight, lora_a, lora_b, bias = adapters_case(37, 48, 40, 16, 4, None, device, seed=21)
    ranks = [16, 5, 0, 12]
    for adapter, r in enumerate(ranks):
        lora_a[adapter, r:] = float("nan")
        lora_b[adapter, :, r:] = float("nan")
    ids = unsorted_ids(37, 4, seed=22).to(device)
    out = check_multi(x, weight, lora_a, lora_b, 0.5, "mixed ranks", adapter_ids=ids, ranks=ranks)
    assert torch.isfinite(out).all()
    # the same ranks as an int32 tensor on the device (what a CUDA graph captures)
    check_multi(x, weight, lora_a, lora_b, 0.5, "ranks tensor", adapter_ids=ids,
                ranks=torch.tensor(ranks, dtype=torch.int32, device=device))


def test_multi_adapter_with_one_adapter_and_int64_ids(device):
    """L = 1 through adapter_ids (int64, every row 0 but one -1) equals the single-adapter call."""
    x, weight, lora_a, lora_b, bias = adapters_case(19, 24, 32, 8, 1, None, device, seed=23)
    ids = torch.zeros(19, dtype=torch.int64, device=device)
    ids[7] = -1
    check_multi(x, weight, lora_a, lora_b, 0.75, "L=1", adapter_ids=ids, bias=bias)


@pytest.mark.parametrize("m", [1, 37])
def test_slices_forward_and_gradients(device, m):
    """Fused QKV-style slices [16, 24, 8] (a slice boundary inside a column tile), one adapter per
    slice with its own scale, rank 8 and 3 (padded): forward and dx, d lora_a, d lora_b, d bias under
    the parity rule; with dropout too."""
    for rank, dropout_p in ((8, 0.0), (3, 0.3)):
        x, weight, lora_a, lora_b, bias = adapters_case(m, 48, 40, rank, 3, None, device, seed=m + rank)
        lora_b = lora_b[0]   # (N, r): the slices' B stacked along N
        scale = torch.tensor([0.5, 2.0, 1.0], device=device)
        kwargs = dict(bias=bias, slices=[16, 24, 8], dropout_p=dropout_p, seed=99)
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b, bias)]
        out = lora.lora_linear(leaves[0], weight, leaves[1], leaves[2], scale,
                               **{**kwargs, "bias": leaves[3]})
        dy = randn(out.shape, dtype=out.dtype, seed=m + 7).to(out.device)
        grads = torch.autograd.grad(out, leaves, dy)

        def run(dtype, upcast):
            ref = [t.detach().cpu().to(dtype).requires_grad_() for t in (x, lora_a, lora_b, bias)]
            y = reference.lora_linear(ref[0], weight.cpu().to(dtype), ref[1], ref[2], scale.cpu(),
                                      **{**kwargs, "bias": ref[3]}, upcast=upcast)
            return (y,) + torch.autograd.grad(y, ref, dy.cpu().to(dtype))

        for label, got, same, oracle in zip(("out", "dx", "d lora_a", "d lora_b", "d bias"), (out,) + grads,
                                            run(x.dtype, False), run(torch.float64, True)):
            assert got.shape == same.shape, label
            assert_parity(got.detach().cpu(), same.detach(), oracle.detach(), f"M={m} r={rank} {label}")


def test_multi_adapter_with_slices_and_dropout(device):
    """Both: lora_a (L, S, r, K), scale (L, S), ranks, -1 rows, and LoRA's input dropout."""
    x, weight, lora_a, lora_b, bias = adapters_case(37, 48, 40, 16, 3, 2, device, seed=31)
    scale = torch.tensor([[0.5, 1.0], [2.0, 0.25], [1.0, 1.5]], device=device)
    check_multi(x, weight, lora_a, lora_b, scale, "adapters x slices", adapter_ids=unsorted_ids(37, 3, 32).to(device),
                ranks=[16, 8, 11], slices=[32, 16], bias=bias, dropout_p=0.2, seed=5)


def test_multi_adapter_refuses_bad_inputs():
    x, weight, lora_a, lora_b, bias = adapters_case(6, 16, 24, 8, 3, None, "cpu", seed=33)
    ids = torch.tensor([0, 1, 2, -1, 0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\)"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, adapter_ids=torch.tensor([0, 1, 3, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\)"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, adapter_ids=torch.tensor([0, -2, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \(6,\)"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, adapter_ids=ids[:5])
    with pytest.raises(TypeError, match="adapter_ids must be an int32 or int64 tensor"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, adapter_ids=ids.float())
    with pytest.raises(ValueError, match=r"lora_b must be \(3, 16, 8\)"):
        lora.lora_linear(x, weight, lora_a, lora_b[:2], 1.0, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"lora_b must be \(3, 16, 8\)"):
        lora.lora_linear(x, weight, lora_a, lora_b[:, :, :4], 1.0, adapter_ids=ids)
    with pytest.raises(ValueError, match="lora_a must have 3 dimensions"):
        lora.lora_linear(x, weight, lora_a[0], lora_b, 1.0, adapter_ids=ids)
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, 8\]"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, adapter_ids=ids, ranks=[8, 9, 1])
    with pytest.raises(ValueError, match="ranks must be 3 ints"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, adapter_ids=ids, ranks=[8, 8])
    with pytest.raises(ValueError, match="ranks needs adapter_ids"):
        lora.lora_linear(x, weight, lora_a[0], lora_b[0], 1.0, ranks=[8])
    with pytest.raises(ValueError, match=r"scale must be a number, a 0-d tensor or a tensor of shape \(3,\)"):
        lora.lora_linear(x, weight, lora_a, lora_b, torch.ones(2), adapter_ids=ids)
    with pytest.raises(ValueError, match="multi-adapter lora_linear .* is forward-only"):
        lora.lora_linear(x.requires_grad_(), weight, lora_a, lora_b, 1.0, adapter_ids=ids)
    x = x.detach()
    with pytest.raises(ValueError, match="slices must be 1 to 8 positive multiples of 8 summing to N = 16"):
        lora.lora_linear(x, weight, lora_a, lora_b[0], 1.0, slices=[8, 4, 4])
    with pytest.raises(ValueError, match=r"lora_a must have 2 slices \(len\(slices\)\)"):
        lora.lora_linear(x, weight, lora_a, lora_b[0], 1.0, slices=[8, 8])
    # an id out of range with check_ids=False is read as -1 (the base alone), never out of bounds
    with torch.no_grad():
        out = lora.lora_linear(x, weight, lora_a, lora_b, 1.0, adapter_ids=torch.tensor([0, 1, 7, -1, 0, 1]),
                               check_ids=False)
        base = lora.lora_linear(x, weight, lora_a, lora_b, 1.0, adapter_ids=torch.tensor([0, 1, -1, -1, 0, 1]))
    assert torch.equal(out, base)


def test_row_order_reads_and_writes_rows_through_it(device):
    """The native op's row_order (the segment-style order lora_linear passes at M > SORTED_ROWS on the
    CUDA kernels): any permutation of the rows, adapter_ids given in that order, gives the same out as
    the rows in place, bit for bit (a row's sums do not depend on the tile it lands in)."""
    m = 70
    x, weight, lora_a, lora_b, bias = adapters_case(m, 40, 72, 16, 3, None, device, seed=61)
    ids = unsorted_ids(m, 3, 62).to(device)
    order = torch.randperm(m, generator=generator(63)).to(torch.int32).to(device)
    op = torch.ops.llmkernels.lora_linear.default
    args = lambda ids, order: (x, None, weight, lora_a[:, None], lora_b, 0.5, None, bias.float(), ids, order, None,
                               [40], None, None, 0, False)
    with torch.no_grad():
        plain = op(*args(ids, None))
        ordered = op(*args(ids[order.long()].contiguous(), order))
    assert torch.equal(ordered[1], plain[1])
    assert torch.equal(ordered[0], plain[0][order.long()])   # (shrink's rows in the order)
    with pytest.raises(ValueError, match="row_order needs adapter_ids"):
        op(x, None, weight, lora_a[:1, None], lora_b[:1], 0.5, None, None, None, order, None, [40], None, None, 0,
           False)


def test_unchecked_ids_and_ranks_stay_in_bounds(device):
    """check_ids=False: an int64 id past int32 is read as -1 (not wrapped into range), and a ranks tensor
    outside [0, r] is clamped (the emulated kernels would report a read past lora_b otherwise)."""
    x, weight, lora_a, lora_b, bias = adapters_case(4, 32, 32, 8, 2, None, device, seed=81)
    wide = torch.tensor([0, 1, 2 ** 32, 2 ** 32 - 1], device=device)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 2\)"):
        lora.lora_linear(x, weight, lora_a, lora_b, 0.5, adapter_ids=wide)
    with torch.no_grad():
        out = lora.lora_linear(x, weight, lora_a, lora_b, 0.5, adapter_ids=wide, check_ids=False)
        expected = lora.lora_linear(x, weight, lora_a, lora_b, 0.5, adapter_ids=torch.tensor([0, 1, -1, -1], device=device))
        assert torch.equal(out, expected)
        ids = torch.tensor([0, 1, 1, 0], device=device)
        ranks = torch.tensor([-3, 64], dtype=torch.int32, device=device)
        clamped = lora.lora_linear(x, weight, lora_a, lora_b, 0.5, adapter_ids=ids, ranks=ranks, check_ids=False)
        assert torch.equal(clamped, lora.lora_linear(x, weight, lora_a, lora_b, 0.5, adapter_ids=ids, ranks=[0, 8]))


@pytest.mark.emu
def test_emulated_multi_adapter_kernels_without_bank_conflicts():
    """M = 130: past SORTED_ROWS, the rows sorted by adapter (segment-style)."""
    x, weight, lora_a, lora_b, bias = adapters_case(130, 40, 72, 16, 4, None, "cpu", seed=41)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate(schedule="shuffled", seed=5), torch.no_grad():
        lora.lora_linear(x, weight, lora_a, lora_b, 0.5, adapter_ids=unsorted_ids(130, 4, 42), bias=bias)
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    assert {name: r["launches"] for name, r in reports.items()} == {
        "lora adapter tiles": 1, "lora shrink": 1, "lora fused": 1}
    for name, r in reports.items():
        assert r["bank_conflicts_by_site"] == {}, name


@pytest.mark.cuda
def test_multi_adapter_cuda_graph_capture():
    """Captured once with device-side ids, ranks and scales; replays follow new ids written in place."""
    x, weight, lora_a, lora_b, bias = adapters_case(16, 256, 512, 16, 8, None, "cuda", seed=43)
    ids = unsorted_ids(16, 8, 44).cuda()
    ranks = torch.tensor([16, 8, 16, 4, 16, 0, 16, 12], dtype=torch.int32, device="cuda")
    scale = torch.linspace(0.5, 2.0, 8, device="cuda")
    call = lambda: lora.lora_linear(x, weight, lora_a, lora_b, scale, adapter_ids=ids, ranks=ranks, bias=bias)
    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        for seed in (45, 46):
            ids.copy_(unsorted_ids(16, 8, seed).cuda())
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, call()), seed


# -- the int4 base (QLoRA) -------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 13, 70])
def test_int4_base_forward_and_gradients(device, m):
    """An Int4Weight base (group 32, K = 96 not a multiple of the int4 kernel's 64-k tiles): the fused
    kernel dequantizes it in its main loop; forward and gradients (dx through the dequantized weight)
    under the parity rule against the reference, which takes the Int4Weight itself."""
    x, weight, lora_a, lora_b, bias = lora_case(m, 40, 96, 16, torch.bfloat16, "cpu", seed=m + 300)
    w4 = quant.quantize_int4(weight, group_size=32)
    leaves = [t.to(device).requires_grad_() for t in (x, lora_a, lora_b, bias)]
    out = lora.lora_linear(leaves[0], w4.to(device), leaves[1], leaves[2], 0.5, bias=leaves[3])
    dy = randn(out.shape, dtype=out.dtype, seed=m + 301).to(out.device)
    grads = torch.autograd.grad(out, leaves, dy)

    def run(dtype, upcast):
        ref = [t.detach().to(dtype).requires_grad_() for t in (x, lora_a, lora_b, bias)]
        y = reference.lora_linear(ref[0], w4, ref[1], ref[2], 0.5, bias=ref[3], upcast=upcast)
        return (y,) + torch.autograd.grad(y, ref, dy.cpu().to(dtype))

    # (the baseline in bf16 dequantizes W to bf16 first, as the kernel does)
    for label, got, same, oracle in zip(("out", "dx", "d lora_a", "d lora_b", "d bias"), (out,) + grads,
                                        run(torch.bfloat16, False), run(torch.float64, True)):
        assert_parity(got.detach().cpu(), same.detach(), oracle.detach(), f"int4 M={m} {label}")


def test_int4_base_with_adapters_and_slices(device):
    x, weight, lora_a, lora_b, bias = adapters_case(37, 48, 64, 8, 3, 2, device, seed=51)
    w4 = quant.quantize_int4(weight.cpu(), group_size=-1, symmetric=True).to(device)
    check_multi(x, w4, lora_a, lora_b, 0.5, "int4 + adapters + slices",
                adapter_ids=unsorted_ids(37, 3, 52).to(device), slices=[16, 32], bias=bias)


def test_int4_base_refuses_mismatched_scales():
    x, weight, lora_a, lora_b, _ = lora_case(4, 16, 64, 8, torch.bfloat16, "cpu", seed=53)
    w4 = quant.quantize_int4(weight, group_size=32)
    with pytest.raises(ValueError, match=r"weight must be \(N, K\) with x's K = 32"):
        lora.lora_linear(x[:, :32], w4, lora_a[:, :32], lora_b, 1.0)
    bad = dataclasses.replace(w4, zeros=w4.zeros[:1])
    with pytest.raises(ValueError, match="zeros"):
        lora.lora_linear(x, bad, lora_a, lora_b, 1.0)


@pytest.mark.emu
def test_emulated_int4_base_kernels_without_bank_conflicts():
    x, weight, lora_a, lora_b, bias = lora_case(37, 64, 128, 16, torch.bfloat16, "cpu", seed=54)
    w4 = quant.quantize_int4(weight, group_size=64)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate(schedule="shuffled", seed=6), torch.no_grad():
        lora.lora_linear(x, w4, lora_a, lora_b, 0.5, bias=bias)
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    assert {name: r["launches"] for name, r in reports.items()} == {"lora shrink": 1, "lora fused (int4 base)": 1}
    for name, r in reports.items():
        assert r["bank_conflicts_by_site"] == {}, name


def test_a_zero_dim_scale_on_the_device_is_read_there(device):
    """A 0-d scale tensor of x's device (CUDA: no host read, graph-safe) gives the number's result,
    forward and gradients."""
    x, weight, lora_a, lora_b, bias = lora_case(9, 16, 24, 8, torch.bfloat16, device, seed=60)
    scale = torch.tensor(0.75, device=x.device)
    a1, a2 = lora_a.clone().requires_grad_(), lora_a.clone().requires_grad_()
    out = lora.lora_linear(x, weight, a1, lora_b, scale, bias=bias)
    expected = lora.lora_linear(x, weight, a2, lora_b, 0.75, bias=bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    g1, = torch.autograd.grad(out.float().sum(), a1)
    g2, = torch.autograd.grad(expected.float().sum(), a2)
    torch.testing.assert_close(g1, g2, rtol=2 ** -8, atol=2 ** -8 * float(g2.abs().max()))


def test_opcheck_and_compile_of_multi_adapter_and_int4_calls():
    """The op's schema with every optional input (adapter ids, row order, ranks, scales, an int4 base),
    and torch.compile of a multi-adapter call with no graph break (fullgraph) equal to eager."""
    m = 70
    x, weight, lora_a, lora_b, bias = adapters_case(m, 48, 64, 8, 3, 2, "cpu", seed=71)
    ids = unsorted_ids(m, 3, 72)
    order = torch.argsort(ids, stable=True).to(torch.int32)
    ranks = torch.tensor([8, 3, 0], dtype=torch.int32)
    scales = torch.rand(3, 2)
    w4 = quant.quantize_int4(weight, group_size=32)
    op = torch.ops.llmkernels.lora_linear.default
    torch.library.opcheck(op, (x, None, weight, lora_a, lora_b, 1.0, scales, bias.float(), ids[order.long()].contiguous(),
                               order, ranks, [32, 16], None, None, 0, False))
    torch.library.opcheck(op, (x, None, w4.packed, lora_a, lora_b, 1.0, scales, bias.float(), ids, None, ranks,
                               [32, 16], w4.scales, w4.zeros, w4.group_size, False))
    call = lambda x, ids: lora.lora_linear(x, weight, lora_a, lora_b, scales, adapter_ids=ids, ranks=[8, 3, 0],
                                           slices=[32, 16], bias=bias)
    with torch.no_grad():
        compiled = torch.compile(call, fullgraph=True)(x, ids)
        assert torch.equal(compiled, call(x, ids))
