"""llmkernels: hand-written CUDA kernels for training and serving LLMs, each with a CPU kernel
and a plain-PyTorch reference (`llmkernels.reference`).

Families: attention (flash-style, `llmkernels.attention` and `attention_varlen`, flash-attn's
signatures), mezo (zeroth-order parameter updates), quant (int4/int8 linear layers) and moe
(Mixture-of-Experts routing, grouped expert GEMMs, the MoE layer); lora in progress. See README.md
and docs/.
"""
from __future__ import annotations

from ._ext import C as _C, build_info, cuda_unusable_reason, cuda_usable

__version__ = _C.__version__

from . import emulator, mezo, moe, quant, reference  # noqa: E402
from ._attention import attention, attention_varlen  # noqa: E402

__all__ = ["attention", "attention_varlen", "build_info", "cuda_usable", "cuda_unusable_reason", "emulator", "mezo",
           "moe", "quant", "reference", "__version__"]
