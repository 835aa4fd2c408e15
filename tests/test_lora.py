"""LoRA-fused matmul (issue 13, in progress): one adapter's forward (CPU, the CUDA kernels emulated,
CUDA) against llmkernels.reference.lora.lora_linear under the parity rule (the float64 reference as
the oracle, the PEFT composition in x's dtype as the baseline)."""
import pytest
import torch

import llmkernels
from llmkernels import lora
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


def test_lora_linear_refuses_bad_inputs():
    x, weight, lora_a, lora_b, bias = lora_case(4, 16, 24, 8, torch.bfloat16, "cpu", seed=5)
    with pytest.raises(ValueError, match=r"lora_b must be \(N, r\) = \(16, 8\)"):
        lora.lora_linear(x, weight, lora_a, lora_b[:, :4], 1.0)
    with pytest.raises(ValueError, match=r"must have x's K = 24 columns"):
        lora.lora_linear(x, weight, lora_a[:, :16], lora_b, 1.0)
    with pytest.raises(TypeError, match="lora_a must have x's dtype"):
        lora.lora_linear(x, weight, lora_a.float(), lora_b, 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        lora.lora_linear(x, weight, lora_a, lora_b, float("inf"))
    with pytest.raises(ValueError, match=r"bias must be a \(16,\) tensor"):
        lora.lora_linear(x, weight, lora_a, lora_b, 1.0, bias=bias[:8])
    with pytest.raises(NotImplementedError, match="backward is not written yet"):
        lora.lora_linear(x, weight, lora_a.requires_grad_(), lora_b, 1.0)


@pytest.mark.emu
def test_emulated_lora_launches_two_kernels_without_bank_conflicts():
    case = lora_case(37, 40, 72, 16, torch.bfloat16, "cpu", seed=6)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate(schedule="shuffled", seed=3):
        lora.lora_linear(*case[:4], 0.25, bias=case[4])
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    assert {name: r["launches"] for name, r in reports.items()} == {"lora shrink": 1, "lora fused": 1}
    for name, r in reports.items():
        assert r["bank_conflicts_by_site"] == {}, name


def test_opcheck_lora_linear():
    x, weight, lora_a, lora_b, bias = lora_case(5, 16, 24, 8, torch.bfloat16, "cpu", seed=7)
    torch.library.opcheck(torch.ops.llmkernels.lora_linear.default, (x, weight, lora_a, lora_b, 0.5, bias.float()))
