"""The one place that loads the native extension, and says clearly what is wrong when it can't."""
from __future__ import annotations

try:
    from . import _C  # noqa: F401  (built by CMake: csrc/ -> llmkernels/_C*.so)
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "llmkernels' native extension (llmkernels._C) could not be loaded: "
        f"{error}. Reinstall with `pip install .` from the source tree; importing from the "
        "source folder itself (python/llmkernels) does not work, the extension is built at install."
    ) from error

C = _C
