"""Plain-PyTorch oracles, one module per kernel family, with the same signatures as the ops."""
from . import attention, gemm, mezo, moe, quant

__all__ = ["attention", "gemm", "mezo", "moe", "quant"]
