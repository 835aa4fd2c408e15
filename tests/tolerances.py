"""The one place test tolerances live (the flash-attn parity rule, DESIGN.md):

A low-precision kernel's error against a float64 oracle must be at most 2x the error of the same
computation done by PyTorch in the same low precision, plus a small absolute floor."""
from __future__ import annotations

import torch

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
