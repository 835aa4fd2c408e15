"""llmkernels: hand-written CUDA kernels for training and serving LLMs, each with a CPU kernel
and a plain-PyTorch reference (`llmkernels.reference`).

Families: mezo (zeroth-order parameter updates). See README.md and docs/.
"""
from __future__ import annotations

from ._ext import C as _C

__version__ = _C.build_info()["version"]

from . import mezo, reference  # noqa: E402


def build_info() -> dict:
    """What this build contains: version, CPU backend, whether CUDA kernels were compiled and for
    which archs, the CUDA runtime and driver versions, OpenMP threads, and whether a GPU is usable
    now (a CUDA build on a machine without a GPU or driver reports gpu_usable=False)."""
    return dict(_C.build_info())


__all__ = ["build_info", "mezo", "reference", "__version__"]
