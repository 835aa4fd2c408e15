"""Argument validators shared by every family: one message and one limit per kind of argument.

What is checked where: Python checks what must fail while tracing under torch.compile (types,
dtypes, devices, shapes, scalar values); the native core checks memory (layouts, overlap between
tensors, index ranges) for every caller, Python or not. Layouts and overlap are checked only by
the core. The core also re-checks the few things its memory safety rests on (the dtype and device
of every pointer it dereferences), because callers of `_C` need not come through Python. Each
error names the argument, what was expected and what was given.

Scalars that the kernels compute with in float32 are checked after rounding to float32: 1e39 is
finite as a Python float and infinite for the kernel.
"""
from __future__ import annotations

import math
import numbers
import struct
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT32_MAX = torch.finfo(torch.float32).max


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def normalize_device(device) -> torch.device:
    """torch.device("cuda") and "cuda:0" name the same device when 0 is current: give the index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_tensor(tensor, name: str, *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """A dense (strided) tensor of one of `dtypes` on a CPU or CUDA device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} is a sparse tensor (layout {tensor.layout}); llmkernels takes dense tensors "
                        "(call .to_dense() first)")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {dtype_names(dtypes)}; got {dtype_names([tensor.dtype])}")
    if tensor.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{name} must be on a CPU or CUDA device; got {tensor.device}")
    return tensor


def check_same_device(tensor: torch.Tensor, name: str, device: torch.device, other: str) -> None:
    if normalize_device(tensor.device) != normalize_device(device):
        raise RuntimeError(f"{name} is on {tensor.device} but {other} is on {device}; "
                           "all tensors must be on one device")


def tensor_list(tensors, name: str, *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> Tuple[List[torch.Tensor], torch.device]:
    """A non-empty list (or other iterable, not a lone tensor) of tensors on one device; returns the
    list and the device. Per tensor it costs ~0.3 us (a 200-tensor model pays it on every sweep):
    the names of the elements are only formatted for an error."""
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors; got a single tensor (wrap it in a list)")
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(f"{name} must be a list of tensors; got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name} must be a non-empty list of tensors; got an empty list")
    device = check_tensor(tensors[0], f"{name}[0]", dtypes=dtypes).device
    for index, tensor in enumerate(tensors):
        if not (isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and tensor.dtype in dtypes
                and tensor.device == device):
            check_tensor(tensor, f"{name}[{index}]", dtypes=dtypes)   # raises with the reason,
            check_same_device(tensor, f"{name}[{index}]", device, f"{name}[0]")  # or it is the device
    return tensors, device


def scalar_tensor(value: torch.Tensor, name: str, device: torch.device, dtypes: Sequence[torch.dtype],
                  where: str = "the parameters") -> torch.Tensor:
    """A one-element tensor (any shape) of `dtypes` on `device`."""
    check_tensor(value, name, dtypes=dtypes)
    if value.numel() != 1:
        raise ValueError(f"{name} must hold exactly one element; got shape {tuple(value.shape)}")
    if normalize_device(value.device) != normalize_device(device):
        raise RuntimeError(f"{name} is on {value.device} but {where} are on {device}; it must be on {device}")
    return value


def real(value, name: str) -> float:
    """A real number (not a bool, not a tensor) as a Python float; may be non-finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    return float(value)


def float32_value(value, name: str, *, minimum: Optional[float] = None, positive: bool = False) -> float:
    """A real number that is finite after rounding to float32 (what the kernels compute with),
    optionally >= minimum or > 0. Returns it as a Python float (unrounded)."""
    value = real(value, name)
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.4g}); got {value}")
    if positive and not struct.unpack("f", struct.pack("f", value))[0] > 0:
        raise ValueError(f"{name} must be > 0 (after rounding to float32); got {value}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum:g}; got {value}")
    return value


def integer(value, name: str, low: int, high: int) -> int:
    """An int in [low, high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if not low <= int(value) < high:
        raise ValueError(f"{name} must be an int in [{low}, {high}); got {value}")
    return int(value)


def as_int64_pattern(value: int) -> int:
    """A 64-bit pattern as the int64 an op schema carries (two's complement)."""
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


def seed(value, name: str, device: torch.device) -> Tuple[int, Optional[torch.Tensor]]:
    """A 64-bit seed: an int in [-2**63, 2**64) or a one-element int64 tensor on `device` (read as a
    64-bit pattern, so -1 and 2**64 - 1 are the same seed either way). Returns (value, tensor) for
    an op: the int64 pattern and None, or 0 and the tensor."""
    if isinstance(value, torch.Tensor):
        return 0, scalar_tensor(value, name, device, (torch.int64,))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a one-element int64 tensor; got {type(value).__name__}")
    return as_int64_pattern(integer(value, name, -2**63, 2**64)), None


def members(items, pool: Sequence[torch.Tensor], name: str) -> List[int]:
    """The positions in `pool` of the tensors in `items` (compared by identity)."""
    if isinstance(items, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors; got a single tensor (wrap it in a list)")
    positions = []
    for index, tensor in enumerate(items):
        found = [i for i, p in enumerate(pool) if p is tensor]
        if not found:
            raise ValueError(f"{name}[{index}] is not one of params (compared by identity)")
        positions += found
    return positions


def rows_aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last-dimension rows can be copied in 16-byte pieces (unit stride along the
    last dimension, a 16-byte aligned start, other strides multiples of 16 bytes: what the CUDA
    kernels' tiles need, and any slice of a packed qkv tensor is), else an aligned contiguous copy."""
    # (The storage offset, not data_ptr(): fake tensors have no data, and torch's allocations are
    # aligned to at least 64 bytes. torch.compile does not trace storage_offset(): there the strides
    # decide, and the native layer refuses a misaligned start with a clear error.)
    size = t.element_size()
    aligned = (t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1) and all(
        n <= 1 or stride * size % 16 == 0 for n, stride in zip(t.shape[:-1], t.stride()[:-1]))
    if aligned and not torch.compiler.is_compiling():
        aligned = t.storage_offset() * size % 16 == 0
    # (clone, not contiguous(): a contiguous tensor that starts off the boundary is its own contiguous())
    return t if aligned else t.clone(memory_format=torch.contiguous_format)


def device_kernels(t: torch.Tensor) -> bool:
    """Whether the op on `t` runs a CUDA kernel (on a GPU, or emulated): what sizes its workspaces."""
    from . import emulator
    return t.device.type == "cuda" or emulator.enabled()
