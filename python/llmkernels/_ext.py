"""The one place that loads the native extension and answers "can the CUDA kernels run here?".

Importing this module does not touch the CUDA driver (forked DataLoader workers and import time
depend on that): the driver is first asked in `cuda_unusable_reason()`, `build_info()` or an op.
"""
from __future__ import annotations

import functools
from typing import Optional

try:
    from . import _C  # noqa: F401  (built by CMake: csrc/ -> llmkernels/_C*.so)
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "llmkernels' native extension (llmkernels._C) could not be loaded: "
        f"{error}. Reinstall with `pip install .` from the source tree; importing from the "
        "source folder itself (python/llmkernels) does not work, the extension is built at install."
    ) from error

C = _C


@functools.lru_cache(maxsize=None)
def cuda_unusable_reason() -> Optional[str]:
    """None when this build's CUDA kernels can run on the current CUDA device; otherwise why not:
    the build has no CUDA kernels, torch or the CUDA runtime sees no GPU, or the build has no kernel
    image for the GPU's architecture (e.g. built for sm_90a, running on an A100). Asked once per
    process (it initialises the CUDA driver)."""
    if not C.build_config()["cuda_compiled"]:
        return C.cuda_unusable_reason(0)   # the native core's message (no driver call in such a build)
    import torch
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no usable CUDA device (torch.cuda.is_available() is False)"
    return C.cuda_unusable_reason(torch.cuda.current_device()) or None


def cuda_usable() -> bool:
    """True when llmkernels' CUDA kernels can run here (see `cuda_unusable_reason`)."""
    return cuda_unusable_reason() is None


def build_info() -> dict:
    """What this build contains and what it finds on this machine: version, git commit, CPU
    backend and OpenMP threads, whether CUDA kernels were compiled and for which architectures, the
    CUDA runtime and driver versions, the CUDA devices, and whether the CUDA kernels are usable now
    (`gpu_usable`, with `gpu_unusable_reason` when not). Queries the CUDA driver in CUDA builds."""
    info = dict(C.build_config())
    runtime, driver = C.cuda_versions()
    info.update(cuda_runtime_version=runtime, cuda_driver_version=driver,
                cuda_device_count=C.cuda_device_count(), gpu_unusable_reason=cuda_unusable_reason())
    info["gpu_usable"] = info["gpu_unusable_reason"] is None
    return info
