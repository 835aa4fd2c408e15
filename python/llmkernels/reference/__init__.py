"""Plain-PyTorch oracles, one module per kernel family, with the same signatures as the ops."""
from . import mezo

__all__ = ["mezo"]
