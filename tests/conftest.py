"""Device parametrization: every kernel test runs on CPU, and on CUDA when this build has CUDA
kernels and a GPU is usable. CUDA cases carry the `cuda` marker (select them with -m cuda)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers: tolerances, philox_numpy

import llmkernels  # noqa: E402

CUDA_USABLE = bool(llmkernels.build_info()["cuda_compiled"]) and torch.cuda.is_available()
if llmkernels.build_info()["cuda_compiled"]:
    CUDA_SKIP_REASON = "no usable CUDA GPU on this machine"
else:
    CUDA_SKIP_REASON = "this llmkernels build has no CUDA kernels"

requires_cuda = pytest.mark.skipif(not CUDA_USABLE, reason=CUDA_SKIP_REASON)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, requires_cuda]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
