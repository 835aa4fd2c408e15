"""MeZO: the generator, the sweeps, the optimizer. Oracles: an independent NumPy Philox with
float64 Box-Muller (philox_numpy.py), Random123's published known-answer vectors, statistics of
the normal distribution, and llmkernels.reference.mezo (the paper's algorithm in plain PyTorch)."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from scipy import stats

import llmkernels
from llmkernels import mezo
from llmkernels import reference
from llmkernels._ext import C

from helpers import CUDA_USABLE, FLOAT_DTYPES as DTYPES, assert_parity, randn_list, ulps
from philox_numpy import noise_float64

# Odd sizes around the kernels' boundaries: groups of 4, CPU lanes of 64, CUDA chunks of 4096,
# CPU chunks of 16384; 0-dim tensors and empty tensors in the list.
SHAPES = [(), (1,), (3,), (5,), (63,), (65, 1), (7, 9), (4097,), (3, 5461), (16385,), (0,), (2, 0, 3)]


def make_params(shapes, dtype, device, seed=0):
    return randn_list(shapes, dtype=dtype, device=device, seed=seed)


def oracle_update(params, seed, lr, grad, eps, wd, skip=(), next_seed=None, next_scale=0.0):
    """The restore + update in float64 on the same z (z itself checked separately)."""
    out = []
    for i, p in enumerate(params):
        z = mezo.noise(seed, i, p.numel()).double().view(p.shape)
        theta = p.double().cpu() + eps * z
        decay = 0.0 if i in skip else wd
        theta = theta - lr * (grad * z + decay * theta)
        if next_seed is not None:
            theta = theta + next_scale * mezo.noise(next_seed, i, p.numel()).double().view(p.shape)
        out.append(theta)
    return out


# ---------------------------------------------------------------------------------------------
# The generator


@pytest.mark.parametrize(
    "counter,key,expected",
    [  # Random123's known-answer vectors for philox4x32-10
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert C.testing.philox4x32_10(counter, key) == expected


@pytest.mark.parametrize("seed,tensor_index", [(0, 0), (12345, 7), (2**63 - 1, 2**32 - 1)])
def test_noise_matches_independent_float64_oracle(seed, tensor_index):
    n = 200_003
    z = mezo.noise(seed, tensor_index, n).double()
    expected = torch.from_numpy(noise_float64(seed, tensor_index, n))
    # float32 log/sqrt/sin/cos by polynomials: a few roundings, measured at most 2.9 ulp.
    assert ((z - expected).abs() <= 4 * ulps(expected)).all()


def test_vectorized_cpu_noise_equals_scalar_path_bit_for_bit():
    # The CPU kernel vectorizes across groups (AVX-512/AVX2 clones); the scalar normal4() is what
    # the CUDA kernel runs. Any FMA contraction or reordering in either would show here.
    for seed, index, numel in [(1, 0, 4 * 1000 + 3), (99, 5, 70_001)]:
        z = mezo.noise(seed, index, numel)
        scalar = torch.tensor(C.testing.normal4_scalar(seed, index, 0, (numel + 3) // 4))[:numel]
        assert torch.equal(z, scalar)


def test_noise_depends_only_on_seed_index_element():
    a = mezo.noise(7, 3, 10_000)
    assert torch.equal(a, mezo.noise(7, 3, 10_000))
    assert torch.equal(a[:1234], mezo.noise(7, 3, 1234))  # a prefix is the same numbers
    for other in (mezo.noise(8, 3, 10_000), mezo.noise(7, 4, 10_000), mezo.noise(2**40 + 7, 3, 10_000)):
        assert not torch.equal(a, other)
        corr = torch.corrcoef(torch.stack([a, other]))[0, 1].item()
        assert abs(corr) < 5 / 10_000**0.5  # independent: |r| ~ N(0, 1/n)


def test_noise_moments_and_kolmogorov_smirnov():
    n = 1_000_000
    z = mezo.noise(2024, 0, n).double().numpy()
    # standard errors for n = 1e6: mean 1e-3, variance 1.4e-3, skewness 2.4e-3, kurtosis 4.9e-3
    assert abs(z.mean()) < 5e-3
    assert abs(z.var() - 1) < 7e-3
    assert abs(stats.skew(z)) < 1.2e-2
    assert abs(stats.kurtosis(z)) < 2.5e-2
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # the two halves of each Box-Muller pair and the two pairs of a group are uncorrelated
    groups = z[: n // 4 * 4].reshape(-1, 4)
    corr = np.corrcoef(groups.T)
    assert np.abs(corr - np.eye(4)).max() < 5 / (n / 4) ** 0.5


def test_noise_across_seeds_is_uniform_in_distribution():
    # the first element of many consecutive seeds (as the optimizer uses them) is N(0, 1)
    first = np.array([mezo.noise(s, 0, 1).item() for s in range(2000)])
    assert stats.kstest(first, "norm").pvalue > 1e-3


def test_noise_dtype_and_device_arguments(device):
    z = mezo.noise(1, 2, 99, dtype=torch.bfloat16, device=device)
    assert z.dtype == torch.bfloat16 and z.device.type == device.type and z.shape == (99,)
    assert torch.equal(z.cpu(), mezo.noise(1, 2, 99).to(torch.bfloat16))
    assert mezo.noise(1, 2, 0, device=device).numel() == 0


@pytest.mark.cuda
def test_cpu_and_cuda_noise_identical_bits():
    for seed, index, numel in [(0, 0, 1 << 20), (2**63 - 1, 2**32 - 1, 100_003)]:
        assert torch.equal(mezo.noise(seed, index, numel), mezo.noise(seed, index, numel, device="cuda").cpu())
    # and the update kernels draw the same z: a perturb of zeros returns z on both devices
    zeros = [torch.zeros(4099, device=d) for d in ("cpu", "cuda")]
    for z in zeros:
        mezo.perturb_([z], 5, 1.0)
    assert torch.equal(zeros[0], zeros[1].cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_and_cuda_sweeps_identical_bits(dtype):
    # Not only z: the per-element arithmetic avoids FMA on both devices, so whole sweeps agree.
    cpu = make_params(SHAPES + [(70_001,)], dtype, "cpu", seed=12)
    cuda = [p.cuda() for p in cpu]
    for params, device in ((cpu, "cpu"), (cuda, "cuda")):
        mezo.perturb_(params, 3, 1e-2)
        mezo.update_(params, 3, 0.05, torch.tensor(-0.7, device=device), 1e-2, weight_decay=0.1,
                     no_decay=[params[2]], next_seed=4)
    for i, (c, g) in enumerate(zip(cpu, cuda)):
        assert torch.equal(c, g.cpu()), f"params[{i}]"


@pytest.mark.emu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_and_emulated_cuda_kernel_identical_bits(dtype):
    """The CUDA kernel's own source, run by the emulator, gives the CPU kernel's bits: the same z and
    the same FMA-free arithmetic, and a partial last group and a misaligned tensor take the scalar path."""
    native = make_params(SHAPES + [(70_001,)], dtype, "cpu", seed=12)
    native.append(torch.randn(1003, generator=torch.Generator().manual_seed(1)).to(dtype)[1:])  # misaligned
    emulated = [p.clone() for p in native]
    for params, emulate in ((native, False), (emulated, True)):
        with (llmkernels.emulator.emulate() if emulate else contextlib.nullcontext()):
            mezo.perturb_(params, 3, 1e-2)
            mezo.update_(params, 3, 0.05, torch.tensor(-0.7), 1e-2, weight_decay=0.1,
                         no_decay=[params[2]], next_seed=4)
    for i, (a, b) in enumerate(zip(native, emulated)):
        assert torch.equal(a, b), f"params[{i}]"


# ---------------------------------------------------------------------------------------------
# The sweeps


def test_perturb_plus_minus_returns_fp32_params_within_rounding(device):
    params = make_params(SHAPES, torch.float32, device)
    original = [p.clone() for p in params]
    eps = 1e-3
    mezo.perturb_(params, 11, eps)
    assert any(not torch.equal(p, o) for p, o in zip(params, original) if p.numel())
    mezo.perturb_(params, 11, -2 * eps)
    mezo.perturb_(params, 11, eps)
    for i, (p, o) in enumerate(zip(params, original)):
        z = mezo.noise(11, i, o.numel()).view(o.shape).to(device)
        # three roundings, each at most half an ulp of a value at most |theta| + 2 eps |z|
        bound = 2 * 2.0**-23 * (o.abs() + 2 * eps * z.abs())
        assert ((p - o).abs() <= bound).all(), f"params[{i}]"


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_matches_reference(device, dtype):
    params = make_params(SHAPES, dtype, device, seed=1)
    expected = [p.clone() for p in params]
    mezo.perturb_(params, 3, 0.25)
    reference.mezo.perturb_(expected, 3, 0.25)
    oracle = [o.double().cpu() + 0.25 * mezo.noise(3, i, o.numel()).double().view(o.shape)
              for i, o in enumerate(make_params(SHAPES, dtype, "cpu", seed=1))]
    for i, (p, e, o) in enumerate(zip(params, expected, oracle)):
        assert p.dtype == dtype
        assert_parity(p, e, o, f"params[{i}]")


def check_update_against_reference(params, seed, lr, grad, eps, wd, *, grad_arg=None, no_decay=(), next_seed=None):
    """update_ vs reference.mezo.update_ vs the float64 oracle, with the parity rule."""
    original = [p.clone() for p in params]
    expected = [p.clone() for p in params]
    mezo.update_(params, seed, lr, grad if grad_arg is None else grad_arg, eps, weight_decay=wd,
                 no_decay=[params[i] for i in no_decay], next_seed=next_seed)
    reference.mezo.update_(expected, seed, lr, grad, eps, weight_decay=wd,
                           no_decay=[expected[i] for i in no_decay], next_seed=next_seed)
    oracle = oracle_update(original, seed, lr, grad, eps, wd, skip=set(no_decay), next_seed=next_seed, next_scale=eps)
    for i, (p, e, o) in enumerate(zip(params, expected, oracle)):
        assert p.dtype == original[i].dtype
        assert_parity(p, e, o, f"params[{i}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_as_tensor", [False, True])
def test_update_matches_reference(device, dtype, grad_as_tensor):
    params = make_params(SHAPES, dtype, device, seed=2)
    grad_arg = torch.tensor(-1.75, device=device) if grad_as_tensor else None
    check_update_against_reference(params, 9, 0.05, -1.75, 1e-2, 0.1, grad_arg=grad_arg, no_decay=(1, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_with_next_perturbation_matches_reference(device, dtype):
    params = make_params(SHAPES, dtype, device, seed=3)
    check_update_against_reference(params, 4, 0.1, 0.5, 1e-2, 0.01, next_seed=5)


def test_long_mixed_dtype_list_matches_reference(device):
    # 300 tensors (more than one CUDA launch carries), three dtypes interleaved, empty tensors
    # in the middle: every tensor keeps its own index and dtype.
    dtypes = [DTYPES[i % 3] for i in range(300)]
    shapes = [(0,) if i % 37 == 5 else (1 + (i * 7919) % 3001,) for i in range(300)]
    generator = torch.Generator().manual_seed(6)
    params = [torch.randn(s, generator=generator).to(dtype=d, device=device) for s, d in zip(shapes, dtypes)]
    check_update_against_reference(params, 21, 0.05, 0.4, 1e-2, 0.1, next_seed=22)


def test_seed_and_grad_as_device_tensors_equal_values(device):
    a = make_params(SHAPES, torch.float32, device, seed=4)
    b = [p.clone() for p in a]
    mezo.update_(a, 77, 0.1, 0.3, 1e-2, next_seed=78)
    mezo.update_(b, torch.tensor(77, device=device), 0.1, torch.tensor([0.3], device=device), 1e-2,
                 next_seed=torch.tensor([78], device=device))
    c = make_params(SHAPES, torch.float32, device, seed=4)
    mezo.update_(c, 77, 0.1, torch.tensor(0.3, dtype=torch.float64, device=device), 1e-2, next_seed=78)
    for x, y, w in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, w)


def test_sweep_touches_nothing_outside_its_tensors(device):
    # contiguous views into one buffer, one of them not 16-byte aligned (the kernels' scalar path)
    for dtype in DTYPES:
        base = torch.randn(3 * 5000 + 7).to(dtype=dtype, device=device)
        before = base.clone()
        views = [base[1:4098], base[5000:5003], base[9001:14002]]
        mezo.perturb_(views, 1, 0.5)
        untouched = torch.ones_like(base, dtype=torch.bool)
        untouched[1:4098] = untouched[5000:5003] = untouched[9001:14002] = False
        assert torch.equal(base[untouched], before[untouched])
        for i, (start, stop) in enumerate([(1, 4098), (5000, 5003), (9001, 14002)]):
            changed = base[start:stop] != before[start:stop]
            assert changed.float().mean() > 0.5, f"views[{i}] mostly unchanged"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_rounding_to_16_bit_types_equals_torch(dtype):
    # On the CPU (no FMA) the kernel's float32 value is exactly the reference's, so the results
    # differ only if the kernel's own float -> fp16/bf16 rounding differs from torch's `.to()`:
    # subnormals, values that round to infinity, ties, both signs.
    info = torch.finfo(dtype)
    magnitudes = torch.cat([torch.logspace(-8, 0, 3000) * info.tiny * 4, torch.logspace(-3, 0, 3000) * info.max])
    values = torch.cat([magnitudes, -magnitudes])
    for scale in (1e-3 * info.tiny, 1e-2, 0.05 * info.max):
        params = [values.to(dtype)]
        expected = [values.to(dtype)]
        mezo.perturb_(params, 8, scale)
        reference.mezo.perturb_(expected, 8, scale)
        assert torch.equal(params[0], expected[0]), f"scale {scale}"
    assert torch.isinf(params[0]).any() and (params[0] != 0).all()  # the tails were exercised


def test_zero_scale_perturb_is_exact_for_every_dtype(device):
    for dtype in DTYPES:
        params = make_params(SHAPES, dtype, device, seed=5)
        original = [p.clone() for p in params]
        mezo.perturb_(params, 1, 0.0)
        assert all(torch.equal(p, o) for p, o in zip(params, original))


def test_opcheck_mezo_sweep(device):
    params = make_params([(5,), (3, 4)], torch.float32, device)
    args = (params, [0, 1], [0.0, 0.01], [0.1, 0.1], [0.01, 0.01], 3, None, 0.5, None, 0.1, False, 0, None, 0.0)
    torch.library.opcheck(torch.ops.llmkernels.mezo_sweep.default, args)
    seed = torch.tensor(3, device=device)
    grad = torch.tensor(0.5, device=device)
    args = (params, [0, 1], [0.0, 0.01], [0.1, 0.1], [0.01, 0.01], 0, seed, 0.0, grad, 0.1, True, 4, None, 1e-3)
    torch.library.opcheck(torch.ops.llmkernels.mezo_sweep.default, args)


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    params = make_params([(33,), (8, 8)], torch.float32, device)
    expected = [p.clone() for p in params]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ps):
        mezo.perturb_(ps, 5, 1e-2)
        mezo.update_(ps, 5, 0.1, 0.25, 1e-2)

    step(params)
    mezo.perturb_(expected, 5, 1e-2)
    mezo.update_(expected, 5, 0.1, 0.25, 1e-2)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors():
    good = [torch.randn(4), torch.randn(3)]
    with pytest.raises(ValueError, match="non-empty"):
        mezo.perturb_([], 0, 1.0)
    with pytest.raises(TypeError, match=r"params\[1\] must have dtype float32, bfloat16, float16; got int64"):
        mezo.perturb_([good[0], torch.arange(3)], 0, 1.0)
    with pytest.raises(ValueError, match=r"params\[0\] must be dense and non-overlapping"):
        mezo.perturb_([torch.randn(4, 8)[:, ::2]], 0, 1.0)
    with pytest.raises(ValueError, match=r"params\[0\] must be dense and non-overlapping"):
        mezo.perturb_([torch.randn(4, 1).expand(4, 3)], 0, 1.0)
    with pytest.raises(TypeError, match=r"params\[1\] is a sparse tensor"):
        mezo.perturb_([good[0], torch.eye(3).to_sparse()], 0, 1.0)
    with pytest.raises(RuntimeError, match=r"params\[1\] must be on a CPU or CUDA device"):
        mezo.perturb_([good[0], torch.empty(3, device="meta")], 0, 1.0)
    with pytest.raises(TypeError, match="a single tensor"):
        mezo.perturb_(good[0], 0, 1.0)
    with pytest.raises(ValueError, match=r"params\[1\] overlaps params\[0\] in memory"):
        mezo.perturb_([good[0], good[0]], 0, 1.0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[-9223372036854775808, 18446744073709551616\)"):
        mezo.perturb_(good, 2**64, 1.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        mezo.perturb_(good, 1.5, 1.0)
    with pytest.raises(TypeError, match="seed must have dtype int64"):
        mezo.perturb_(good, torch.tensor(1, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="scale must be finite in float32"):
        mezo.perturb_(good, 0, float("nan"))
    with pytest.raises(ValueError, match="projected_grad must hold exactly one element"):
        mezo.update_(good, 0, 0.1, torch.ones(2), 1e-3)
    with pytest.raises(ValueError, match="^weight_decay must be >= 0"):
        mezo.update_(good, 0, 0.1, 1.0, 1e-3, weight_decay=-1)
    with pytest.raises(ValueError, match=r"no_decay\[0\] is not one of params"):
        mezo.update_(good, 0, 0.1, 1.0, 1e-3, no_decay=[torch.randn(4)])
    base = torch.randn(100)
    with pytest.raises(ValueError, match=r"params\[1\] overlaps params\[0\] in memory"):
        mezo.perturb_([base[0:60], base[40:100]], 0, 1.0)
    with pytest.raises(TypeError, match="no_decay must be a list of tensors"):
        mezo.update_(good, 0, 0.1, 1.0, 1e-3, no_decay=good[0])
    with pytest.raises(ValueError, match="next_scale was given without next_seed"):
        mezo.update_(good, 0, 0.1, 1.0, 1e-3, next_scale=1e-3)
    with pytest.raises(ValueError, match=r"numel must be an int in \[0, "):
        mezo.noise(0, 0, -1)
    with pytest.raises(ValueError, match="tensor_index"):
        mezo.noise(0, 2**32, 4)
    before = [p.clone() for p in good]
    with pytest.raises(ValueError):
        mezo.update_(good, 0, float("inf"), 1.0, 1e-3)
    assert all(torch.equal(p, b) for p, b in zip(good, before))  # nothing ran


def test_native_core_checks_its_own_inputs():
    # The torch-free core validates what arrives through DLPack, for callers that bypass Python.
    from torch.utils.dlpack import to_dlpack
    args = ([0.0], [0.1], [0.0], 0, None, 0.0, None, 0.0, False, 0, None, 0.0, 0)
    with pytest.raises(ValueError, match=r"params\[0\] must be dense and non-overlapping .*; got shape \(4, 4\) "
                                         r"with strides \(8, 2\)"):
        C.mezo_sweep([to_dlpack(torch.randn(4, 8)[:, ::2])], [0], *args)
    with pytest.raises(TypeError, match=r"params\[0\] must be float32, float16 or bfloat16; got int32"):
        C.mezo_sweep([to_dlpack(torch.zeros(4, dtype=torch.int32))], [0], *args)
    with pytest.raises(ValueError, match="one entry per tensor"):
        C.mezo_sweep([to_dlpack(torch.zeros(4))], [0, 1], *args)
    with pytest.raises(TypeError, match="DLPack capsule"):
        C.mezo_sweep([torch.zeros(4)], [0], *args)
    base = torch.zeros(10)
    before = base.clone()
    two = ([0.0] * 2, [0.1] * 2, [0.0] * 2, 0, None, 0.0, None, 0.0, False, 0, None, 0.0, 0)
    with pytest.raises(ValueError, match=r"params\[1\] overlaps params\[0\] in memory"):
        C.mezo_sweep([to_dlpack(base[:6]), to_dlpack(base[5:])], [0, 1], *two)
    # checked before anything runs: the valid float32 tensor listed first is untouched
    mixed = [torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match=r"indices\[1\] must be in \[0, 2\^32\)"):
        C.mezo_sweep([to_dlpack(t) for t in mixed], [0, -1], *two)
    assert torch.equal(base, before) and not mixed[0].any()


@pytest.mark.cuda
def test_mixed_devices_raise():
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda:0 but params\[0\] is on cpu"):
        mezo.perturb_([torch.randn(4), torch.randn(4, device="cuda")], 0, 1.0)
    with pytest.raises(RuntimeError, match="projected_grad is on cpu"):
        mezo.update_([torch.randn(4, device="cuda")], 0, 0.1, torch.tensor(1.0), 1e-3)


# ---------------------------------------------------------------------------------------------
# The optimizer


def least_squares(device, seed=0):
    """float32 weights, loss in float64: MeZO divides the loss difference by 2 eps, which would
    amplify float32 rounding of the loss into trajectory differences between equivalent runs."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(128, 12, generator=generator, dtype=torch.float64).to(device)
    target = torch.randn(12, generator=generator, dtype=torch.float64).to(device)
    b = a @ target
    # requires_grad, as nn.Parameters: MeZO leaves tensors that do not require grad alone.
    weights = [torch.zeros(8, device=device, requires_grad=True), torch.zeros(4, device=device, requires_grad=True)]

    def loss():
        return ((a @ torch.cat(weights).double() - b) ** 2).mean()

    return weights, loss


def test_optimizer_minimizes_least_squares(device):
    weights, loss = least_squares(device)
    initial = loss().item()
    optimizer = mezo.MeZO(weights, lr=2e-2, eps=1e-3, seed=1)
    for _ in range(1500):
        optimizer.step(loss)
    final = loss().item()
    assert final < initial / 1000, f"loss {initial:.3g} -> {final:.3g}"


def test_optimizer_step_equals_reference_algorithm(device):
    weights, loss = least_squares(device)
    optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, weight_decay=0.05, seed=42)
    ref_weights, ref_loss = least_squares(device)
    for k in range(5):
        pos = optimizer.step(loss)
        ref_pos = reference.mezo.step(ref_weights, ref_loss, 42 + k, lr=1e-2, eps=1e-3, weight_decay=0.05)
        torch.testing.assert_close(pos, ref_pos)
    for w, r in zip(weights, ref_weights):
        torch.testing.assert_close(w, r, rtol=1e-5, atol=1e-6)


def test_optimizer_folded_and_capturable_modes_follow_the_same_trajectory(device):
    runs = {}
    for name, options in {"plain": {}, "fold": dict(fold_perturbation=True), "capturable": dict(capturable=True),
                          "both": dict(fold_perturbation=True, capturable=True)}.items():
        weights, loss = least_squares(device)
        optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=5, **options)
        for _ in range(20):
            optimizer.step(loss)
        optimizer.remove_perturbation()
        runs[name] = torch.cat(weights)
    assert not torch.equal(runs["plain"], torch.zeros_like(runs["plain"]))
    for name in ("fold", "capturable", "both"):
        torch.testing.assert_close(runs[name], runs["plain"], rtol=1e-5, atol=1e-6, msg=name)


def test_optimizer_param_groups_and_weight_decay(device):
    weights, loss = least_squares(device)
    optimizer = mezo.MeZO([{"params": [weights[0]], "lr": 1e-2, "weight_decay": 0.1},
                           {"params": [weights[1]], "lr": 0.0}], eps=1e-3, seed=9)
    for _ in range(10):
        optimizer.step(loss)
    assert weights[0].abs().sum() > 0
    # lr = 0: the group's parameters come back to exactly where they were (within rounding)
    torch.testing.assert_close(weights[1], torch.zeros(4, device=device), rtol=0, atol=1e-6)


def test_optimizer_state_dict_round_trip_resumes_identically(device):
    weights, loss = least_squares(device)
    optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=3, fold_perturbation=True)
    for _ in range(4):
        optimizer.step(loss)
    saved_weights = [w.clone() for w in weights]
    saved_state = copy.deepcopy(optimizer.state_dict())
    for _ in range(3):
        optimizer.step(loss)
    continued = torch.cat(weights).clone()

    resumed_weights, resumed_loss = least_squares(device)
    with torch.no_grad():
        for w, s in zip(resumed_weights, saved_weights):
            w.copy_(s)
    resumed = mezo.MeZO(resumed_weights, lr=0.5, eps=0.5, seed=0)
    resumed.load_state_dict(saved_state)
    for _ in range(3):
        resumed.step(resumed_loss)
    assert torch.equal(torch.cat(resumed_weights), continued)


def test_optimizer_seed_sequence_is_reproducible(device):
    results = []
    for seed in (11, 11, 12):
        weights, loss = least_squares(device)
        optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=seed)
        for _ in range(3):
            optimizer.step(loss)
        results.append(torch.cat(weights))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_optimizer_seed_wraps_identically_in_capturable_mode(device):
    runs = []
    for capturable in (False, True):
        weights, loss = least_squares(device)
        optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=2**63 - 2, capturable=capturable)
        for _ in range(4):  # seeds 2^63 - 2 ... 2^63 + 1: past the int64 range
            optimizer.step(loss)
        runs.append(torch.cat(weights))
        assert optimizer.state_dict()["mezo"]["steps_taken"] == 4
    assert torch.equal(runs[0], runs[1])


def test_optimizer_rejects_bad_arguments():
    w = [torch.zeros(3)]
    with pytest.raises(ValueError, match="eps must be"):
        mezo.MeZO(w, eps=0.0)
    with pytest.raises(ValueError, match="lr must be"):
        mezo.MeZO(w, lr=float("nan"))
    with pytest.raises(ValueError, match="needs a closure"):
        mezo.MeZO(w).step(None)
    with pytest.raises(ValueError, match="'mezo' entry"):
        mezo.MeZO(w).load_state_dict(torch.optim.SGD(w, lr=0.1).state_dict())
    optimizer = mezo.MeZO(w)
    optimizer.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[0\] lr must be"):
        optimizer.step(lambda: w[0].sum())


@pytest.mark.cuda
def test_capturing_a_non_capturable_optimizer_raises():
    weights, loss = least_squares("cuda")
    optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3)
    optimizer.step(loss)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"):
        with torch.cuda.graph(graph):
            optimizer.step(loss)


@pytest.mark.cuda
def test_full_step_captured_in_cuda_graph_and_replayed():
    weights, loss = least_squares("cuda")
    optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=21, capturable=True, fold_perturbation=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        optimizer.step(loss)  # warm-up outside the graph (also allocates the device seed)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step(loss)
    for _ in range(4):
        graph.replay()
    torch.cuda.synchronize()
    optimizer.remove_perturbation()  # seed in the device tensor is now 21 + 5

    eager_weights, eager_loss = least_squares("cuda")
    eager = mezo.MeZO(eager_weights, lr=1e-2, eps=1e-3, seed=21)
    for _ in range(5):
        eager.step(eager_loss)
    torch.testing.assert_close(torch.cat(weights), torch.cat(eager_weights), rtol=1e-5, atol=1e-6)
    assert optimizer.state_dict()["mezo"]["steps_taken"] == 5


def test_build_info_describes_the_build():
    info = llmkernels.build_info()
    for key in ("version", "git_commit", "cpu_backend", "openmp_threads", "cuda_compiled", "cuda_archs",
                "cuda_runtime_version", "gpu_usable"):
        assert key in info
    assert info["version"] == llmkernels.__version__
    assert info["gpu_usable"] is llmkernels.cuda_usable() is CUDA_USABLE
    assert (info["gpu_unusable_reason"] is None) is info["gpu_usable"]
    if not info["cuda_compiled"]:
        assert not info["gpu_usable"] and "no CUDA kernels" in info["gpu_unusable_reason"]
    if info["gpu_usable"]:
        assert info["cuda_compiled"] and info["cuda_device_count"] >= 1 and torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Foundation II fixes: each test here failed (or could not run) before its fix


@pytest.mark.cuda
def test_cuda_device_without_index_is_accepted():
    # torch.device("cuda") and a tensor on cuda:0 are the same device (was: "cuda:0 != cuda").
    seed = torch.tensor(11, device="cuda")
    z = mezo.noise(seed, 3, 4097, device="cuda")
    assert torch.equal(z.cpu(), mezo.noise(11, 3, 4097))
    params = [torch.randn(5, device="cuda")]
    mezo.update_(params, seed, 0.1, torch.tensor(0.5, device="cuda"), 1e-3)


def test_long_single_dtype_list_matches_reference(device):
    # 300 float32 tensors: more than the 256 one CUDA launch carries, so the multi-launch path runs.
    shapes = [(1 + (i * 7919) % 2003,) for i in range(300)]
    params = make_params(shapes, torch.float32, device, seed=13)
    check_update_against_reference(params, 5, 0.05, -0.3, 1e-2, 0.1, next_seed=6)


def test_scalars_that_overflow_float32_are_refused():
    params = [torch.randn(4)]
    before = params[0].clone()
    for call, match in [
        (lambda: mezo.perturb_(params, 0, 1e39), "scale must be finite in float32"),
        (lambda: mezo.update_(params, 0, 1e39, 0.5, 1e-3), "lr must be finite in float32"),
        (lambda: mezo.update_(params, 0, 0.1, 0.5, 1e39), "eps must be finite in float32"),
        (lambda: mezo.update_(params, 0, 1e30, 0.5, 1e-3, weight_decay=1e10), r"lr \* weight_decay must be finite"),
        (lambda: mezo.update_(params, 0, 1e20, 0.5, 1e20, weight_decay=1.0),
         r"eps \* \(1 - lr \* weight_decay\) must be finite"),
        (lambda: mezo.update_(params, 0, 0.1, 0.5, 1e-3, next_seed=1, next_scale=1e39), "next_scale must be finite"),
        (lambda: mezo.MeZO(params, lr=1e39), "lr must be finite in float32"),
        (lambda: mezo.MeZO(params, eps=1e39), "eps must be finite in float32"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    assert torch.equal(params[0], before)


def test_update_limits_are_the_optimizers():
    params = [torch.randn(4)]
    for kwargs, match in [(dict(lr=-1.0), "^lr must be >= 0"), (dict(eps=0.0), "^eps must be > 0"),
                          (dict(weight_decay=-0.1), "^weight_decay must be >= 0")]:
        args = dict(lr=0.1, eps=1e-3, weight_decay=0.0) | kwargs
        with pytest.raises(ValueError, match=match):
            mezo.update_(params, 0, args["lr"], 0.5, args["eps"], weight_decay=args["weight_decay"])
        with pytest.raises(ValueError, match=match):
            mezo.MeZO(params, **args)


def test_negative_seeds_are_64_bit_patterns_as_ints_and_tensors():
    expected = mezo.noise(2**64 - 1, 0, 99)
    assert torch.equal(mezo.noise(-1, 0, 99), expected)
    assert torch.equal(mezo.noise(torch.tensor(-1), 0, 99), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad_grad", ["nan", "inf", "tensor-nan", "tensor-float64-overflow"])
def test_update_with_non_finite_grad_only_restores(device, dtype, bad_grad):
    grad = {"nan": float("nan"), "inf": float("-inf"), "tensor-nan": torch.tensor(float("nan"), device=device),
            "tensor-float64-overflow": torch.tensor(1e39, dtype=torch.float64, device=device)}[bad_grad]
    params = make_params(SHAPES, dtype, device, seed=14)
    original = [p.clone() for p in params]
    expected = [p.clone() for p in params]
    mezo.update_(params, 9, 0.05, grad, 1e-2, weight_decay=0.1, next_seed=10)
    reference.mezo.update_(expected, 9, 0.05, grad, 1e-2, weight_decay=0.1, next_seed=10)
    for i, (p, e, o) in enumerate(zip(params, expected, original)):
        # the restore and the next perturbation, no update: theta + eps z + eps z_next
        z = mezo.noise(9, i, o.numel()).double().view(o.shape) + mezo.noise(10, i, o.numel()).double().view(o.shape)
        assert_parity(p, e, o.double().cpu() + 1e-2 * z, f"params[{i}]")


def test_optimizer_skips_steps_with_non_finite_loss(device):
    for fold in (False, True):
        weights, loss = least_squares(device)
        optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=4, fold_perturbation=fold)
        optimizer.step(loss)
        optimizer.remove_perturbation()
        theta = [w.detach().clone() for w in weights]
        bad = torch.tensor(float("nan"), dtype=torch.float64, device=device)
        optimizer.step(lambda: bad)
        optimizer.remove_perturbation()
        for w, t in zip(weights, theta):   # back at theta within the roundings of 3 sweeps
            torch.testing.assert_close(w, t, rtol=0, atol=1e-6)
        assert optimizer.skipped_steps == 1
        optimizer.step(loss)
        assert optimizer.skipped_steps == 1 and optimizer.state_dict()["mezo"]["skipped_steps"] == 1
        assert all(torch.isfinite(w).all() for w in weights)


@pytest.mark.parametrize("bad, error, match", [
    (RuntimeError("bad batch"), RuntimeError, "bad batch"),        # the closure raises
    (None, TypeError, "closure must return"),                       # or returns no loss
    ("0.5", TypeError, "closure must return"),
    ([1.0], TypeError, "closure must return"),
    (torch.ones(2), ValueError, "closure must return"),
    (torch.tensor(True), TypeError, "closure must return"),
    (torch.tensor(1.0, device="meta"), NotImplementedError, None),  # fails only when moved to the device
])
def test_optimizer_restores_params_when_the_closure_fails(device, bad, error, match):
    weights, loss = least_squares(device)
    with torch.no_grad():
        for w in weights:
            w.normal_()
    original = [w.detach().clone() for w in weights]
    for fold in (False, True):
        optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-2, seed=2, fold_perturbation=fold)
        for bad_call in (1, 2):
            calls = []

            def closure():
                calls.append(1)
                if len(calls) != bad_call:
                    return loss()
                if isinstance(bad, Exception):
                    raise bad
                return bad

            with pytest.raises(error, match=match):
                optimizer.step(closure)
            for w, o in zip(weights, original):
                torch.testing.assert_close(w, o, rtol=0, atol=1e-6)


def test_optimizer_leaves_frozen_parameters_alone(device):
    # The loss depends on weights[1] only: freezing weights[0] must leave it bit-identical and
    # not change weights[1]'s trajectory (tensor i keeps drawing z(seed, i)).
    runs = []
    for frozen in (False, True):
        weights, _ = least_squares(device)
        a = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)

        def loss():
            return ((a @ weights[1].double() - 1.0) ** 2).mean()

        with torch.no_grad():
            weights[0].fill_(0.5)
        weights[0].requires_grad_(not frozen)
        optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=8)
        for _ in range(5):
            optimizer.step(loss)
        runs.append([w.detach().clone() for w in weights])
    assert not torch.equal(runs[0][0], torch.full_like(runs[0][0], 0.5))   # trainable: it moved
    assert torch.equal(runs[1][0], torch.full_like(runs[1][0], 0.5))       # frozen: untouched
    assert torch.equal(runs[0][1], runs[1][1])
    weights[1].requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        optimizer.step(loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_layouts_sweep_in_memory_order(device, dtype):
    # channels_last and transposed parameters are dense: swept as their storage, element j of z
    # on the j-th element in memory. Oracle: the same sweep on contiguous copies in memory order.
    base = make_params([(3, 5, 4, 6), (7, 9)], dtype, device, seed=15)
    params = [base[0].contiguous(memory_format=torch.channels_last), base[1].t()]
    assert not any(p.is_contiguous() for p in params)
    # (copies: .contiguous() of a view that already is contiguous would alias the parameter)
    in_memory_order = [params[0].permute(0, 2, 3, 1).clone(), params[1].t().clone()]
    assert all(m.is_contiguous() for m in in_memory_order)
    expected = [p.clone() for p in params]
    perturbed = [m.double().cpu() + 0.25 * mezo.noise(3, i, m.numel()).double().view(m.shape)
                 for i, m in enumerate(in_memory_order)]
    oracle = oracle_update(perturbed, 3, 0.05, 0.5, 1e-2, 0.1, next_seed=4, next_scale=1e-2)
    for ps, sweep in ((params, mezo), (in_memory_order, mezo), (expected, reference.mezo)):
        sweep.perturb_(ps, 3, 0.25)
        sweep.update_(ps, 3, 0.05, 0.5, 1e-2, weight_decay=0.1, next_seed=4)
    assert torch.equal(params[0].permute(0, 2, 3, 1), in_memory_order[0])
    assert torch.equal(params[1].t(), in_memory_order[1])
    in_order = [lambda t: t.permute(0, 2, 3, 1), lambda t: t.t()]
    for i, (p, e, o, view) in enumerate(zip(params, expected, oracle, in_order)):
        assert_parity(view(p), view(e), o, f"params[{i}]")
        assert_parity(view(e), view(p), o, f"reference params[{i}]")   # and the reference is as close


def test_optimizer_checks_derived_coefficients_before_touching_params():
    params = [torch.randn(4, requires_grad=True)]
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match=r"eps \* \(1 - lr \* weight_decay\) must be finite in float32"):
        mezo.MeZO(params, lr=1e20, eps=1e20, weight_decay=1.0)
    optimizer = mezo.MeZO(params, lr=1e-2, eps=1e3)
    optimizer.param_groups[0]["weight_decay"] = 1e38   # lr * wd = 1e36, eps (1 - lr wd) = -1e39
    with pytest.raises(ValueError, match=r"eps \* \(1 - param_groups\[0\] lr \* param_groups\[0\] weight_decay\) must"):
        optimizer.step(lambda: params[0].sum())
    assert torch.equal(params[0].detach(), before)


def test_folded_perturbation_is_removed_from_parameters_frozen_after_the_step(device):
    # Oracle: the same two folded steps without freezing, then remove_perturbation().
    weights, loss = least_squares(device)
    optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=6, fold_perturbation=True)
    for _ in range(2):
        optimizer.step(loss)
    optimizer.remove_perturbation()
    expected = weights[0].detach().clone()
    for action in ("remove_perturbation", "step"):
        weights, loss = least_squares(device)
        optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=6, fold_perturbation=True)
        for _ in range(2):
            optimizer.step(loss)              # leaves theta + eps z_next on both tensors
        weights[0].requires_grad_(False)      # frozen while it holds the pending perturbation
        if action == "remove_perturbation":
            optimizer.remove_perturbation()
        else:
            optimizer.step(loss)              # first takes the pending perturbation off weights[0]
        assert torch.equal(weights[0].detach(), expected), action


def test_eps_whose_double_overflows_or_that_rounds_to_zero_is_refused():
    params = [torch.zeros(4, requires_grad=True)]
    with pytest.raises(ValueError, match=r"2 \* eps must be finite in float32"):
        mezo.MeZO(params, eps=2e38)
    with pytest.raises(ValueError, match=r"eps must be > 0 \(after rounding to float32\)"):
        mezo.MeZO(params, eps=1e-46)
    with pytest.raises(ValueError, match=r"eps must be > 0 \(after rounding to float32\)"):
        mezo.update_(params, 0, 0.1, 0.5, 1e-46)


def test_projected_grad_inside_a_parameter_is_refused(device):
    params = [torch.randn(8, device=device)]
    before = params[0].clone()
    with pytest.raises(ValueError, match=r"projected_grad overlaps params\[0\] in memory"):
        mezo.update_(params, 0, 0.1, params[0][3], 1e-3)
    assert torch.equal(params[0], before)
    seed = torch.tensor(5, device=device)   # read-only scalars may share memory with each other
    mezo.update_(params, seed, 0.1, 0.5, 1e-3, next_seed=seed)
    assert not torch.equal(params[0], before)


def test_state_dict_remembers_which_tensors_hold_the_pending_perturbation(device):
    weights, loss = least_squares(device)
    optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=6, fold_perturbation=True)
    for _ in range(2):
        optimizer.step(loss)
    saved_weights = [w.detach().clone() for w in weights]
    saved_state = copy.deepcopy(optimizer.state_dict())
    assert saved_state["mezo"]["perturbed_indices"] == [0, 1]
    optimizer.remove_perturbation()
    expected = [w.detach().clone() for w in weights]

    resumed_weights, _ = least_squares(device)
    with torch.no_grad():
        for w, s in zip(resumed_weights, saved_weights):
            w.copy_(s)
    resumed_weights[0].requires_grad_(False)     # frozen at load time: it still holds +eps z
    resumed = mezo.MeZO(resumed_weights, lr=0.5, eps=0.5)
    resumed.load_state_dict(saved_state)
    resumed.remove_perturbation()
    for w, e in zip(resumed_weights, expected):
        assert torch.equal(w.detach(), e)


def test_load_state_dict_keeps_the_capturable_device_tensors(device):
    # A step captured in a CUDA graph keeps reading the seed and counter tensors it captured:
    # load_state_dict must update them in place, not replace them.
    weights, loss = least_squares(device)
    optimizer = mezo.MeZO(weights, lr=1e-2, eps=1e-3, seed=3, capturable=True)
    optimizer.step(loss)
    state = copy.deepcopy(optimizer.state_dict())
    seed_tensor, skipped = optimizer._seed_tensor, optimizer._skipped
    optimizer.step(loss)
    optimizer.load_state_dict(state)
    assert optimizer._seed_tensor is seed_tensor and optimizer._skipped is skipped
    assert int(seed_tensor.item()) == 3 + 1 and optimizer.state_dict()["mezo"]["steps_taken"] == 1
