"""Plain-PyTorch oracles, one module per kernel family, with the same signatures as the ops."""
from . import gemm, mezo

__all__ = ["gemm", "mezo"]
