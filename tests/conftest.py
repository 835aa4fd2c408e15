"""Device parametrization and the `cuda` marker: every kernel test runs on CPU, on CPU tensors with
the CUDA kernels emulated ("emu"), and on CUDA when llmkernels says its CUDA kernels can run here
(`llmkernels.cuda_unusable_reason()`); otherwise every test marked `cuda` skips with that reason.
Helpers live in helpers.py, not here."""
from __future__ import annotations

import pytest
import torch

import llmkernels

import helpers


def pytest_collection_modifyitems(config, items):
    if helpers.CUDA_USABLE:
        return
    skip = pytest.mark.skip(reason=f"CUDA not usable: {helpers.CUDA_UNUSABLE_REASON}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=helpers.DEVICES)
def device(request):
    """torch.device("cpu") for cpu and emu (with the emulator switched on for the test), or "cuda"."""
    if request.param == "emu":
        with llmkernels.emulator.emulate():
            yield torch.device("cpu")
    else:
        yield torch.device(request.param)
