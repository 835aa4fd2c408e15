"""Microbenchmarks: `python -m llmkernels bench` (runner.py) over cases registered by family.

Adding a family: write bench/<family>.py with an `@register("<family>")` function
`cases(device, quick) -> list[Case]`, each case with a check for our kernel and one for its anchor
(core.Case), and import it below. bench/test_bench.py then times it with pytest-benchmark, and
bench/gpu_check.sh runs the repository's bench/sanitize_<family>.py and bench/probe_<family>.py
(if any) on a GPU machine.
"""
from .core import Case, Target, build_cases, register
from . import mezo  # noqa: F401,E402  (registers "mezo")
from . import gemm  # noqa: F401,E402  (registers "gemm")
from . import attention  # noqa: F401,E402  (registers "attention")
from . import quant  # noqa: F401,E402  (registers "quant")
from . import moe  # noqa: F401,E402  (registers "moe")
from . import lora  # noqa: F401,E402  (registers "lora")

__all__ = ["Case", "Target", "build_cases", "register"]
