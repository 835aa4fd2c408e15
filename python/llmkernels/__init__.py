"""llmkernels: hand-written CUDA kernels for training and serving LLMs, each with a CPU kernel
and a plain-PyTorch reference (`llmkernels.reference`).

Families: mezo (zeroth-order parameter updates). See README.md and docs/.
"""
from __future__ import annotations

from ._ext import C as _C, build_info, cuda_unusable_reason, cuda_usable

__version__ = _C.__version__

from . import emulator, mezo, reference  # noqa: E402

__all__ = ["build_info", "cuda_usable", "cuda_unusable_reason", "emulator", "mezo", "reference", "__version__"]
