"""Plain-PyTorch oracles, one module per kernel family, with the same signatures as the ops."""
from . import attention, gemm, lora, mezo, moe, quant

__all__ = ["attention", "gemm", "lora", "mezo", "moe", "quant"]
