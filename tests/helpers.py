"""The one helpers module of the test suite: devices, seeded inputs, poisoned outputs, odd sizes
and the tolerances (the flash-attn parity rule, docs/design.md). Test files `import helpers`;
nothing imports conftest.

A low-precision kernel's error against a float64 oracle must be at most 2x the error of the same
computation done by PyTorch in the same low precision, plus a small absolute floor."""
from __future__ import annotations

from typing import Sequence

import pytest
import torch

import llmkernels

# -- devices: one marker, `cuda`, for everything that needs the GPU ------------------------------
# The library's own answer (it also says no when this build has no kernel image for the GPU's
# architecture); conftest.py skips every `cuda`-marked test with this reason.
CUDA_UNUSABLE_REASON = llmkernels.cuda_unusable_reason()
CUDA_USABLE = CUDA_UNUSABLE_REASON is None

# The backends a kernel test runs on, through the `device` fixture of conftest.py: the CPU kernels,
# the CUDA kernels' own source under the SIMT emulator on CPU tensors ("emu", docs/emulator.md),
# and the CUDA kernels on a GPU.
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("emu", id="emu", marks=pytest.mark.emu),
           pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Odd sizes (Liger-Kernel's habit): none a multiple of a tile, a vector width or a group.
ODD_SIZES = (1, 3, 5, 6, 42, 63, 65, 123, 431)


# A module's tests on tiny tensors run single-threaded: `from helpers import one_thread` (an autouse
# fixture) makes a module so (intra-op threads only cost there, badly so on a busy 2-core machine).
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- inputs --------------------------------------------------------------------------------------

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, *, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard normal values (drawn on the CPU, so every device gets the same numbers)."""
    return (torch.randn(shape, generator=generator(seed)) * scale).to(dtype=dtype, device=device)


def randn_list(shapes: Sequence, *, dtype=torch.float32, device="cpu", seed: int = 0):
    g = generator(seed)
    return [torch.randn(shape, generator=g).to(dtype=dtype, device=device) for shape in shapes]


def poisoned(shape, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer filled with NaN (the largest value for integer dtypes), so elements that a
    kernel fails to write fail the test."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


# -- tolerances ----------------------------------------------------------------------------------

# Absolute floors, per dtype: well below one unit in the last place at magnitude 1.
ABS_FLOOR = {torch.float32: 1e-7, torch.bfloat16: 1e-4, torch.float16: 1e-5}


def assert_parity(actual: torch.Tensor, torch_same_precision: torch.Tensor, oracle: torch.Tensor, name: str = "") -> None:
    """max|actual - oracle| <= 2 max|torch_same_precision - oracle| + floor(dtype)."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in the kernel's output"
    if actual.numel() == 0:
        return
    error = (actual.double().cpu() - oracle.double().cpu()).abs().max().item()
    baseline = (torch_same_precision.double().cpu() - oracle.double().cpu()).abs().max().item()
    bound = 2 * baseline + ABS_FLOOR[actual.dtype]
    assert error <= bound, f"{name}: max error {error:.3e} > bound {bound:.3e} (torch's own error {baseline:.3e})"


def ulps(x: torch.Tensor) -> torch.Tensor:
    """One float32 unit in the last place at max(|x|, 1), as float64."""
    magnitude = x.double().abs().clamp(min=1.0).float()
    return (torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude).double()
