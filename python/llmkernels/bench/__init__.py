"""Microbenchmarks: `python -m llmkernels bench` (runner.py) over cases registered by family.

Adding a family: write bench/<family>.py with an `@register("<family>")` function
`cases(device, quick) -> list[Case]`, and import it below.
"""
from .core import Case, Target, build_cases, register
from . import mezo  # noqa: F401,E402  (registers "mezo")

__all__ = ["Case", "Target", "build_cases", "register"]
