"""How torch tensors cross into the torch-free core: DLPack capsules and the current stream."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.dlpack import to_dlpack


def capsule(tensor: torch.Tensor):
    """A borrowed DLPack view of `tensor` (~0.3 us; the capsule keeps the tensor alive).
    `to_dlpack` accepts tensors that require grad (unlike `Tensor.__dlpack__`), so no detach()
    (another 0.5 us per tensor, 100 us per sweep over a 200-tensor model)."""
    return to_dlpack(tensor)


def optional_capsule(tensor: Optional[torch.Tensor]):
    return None if tensor is None else capsule(tensor)


def stream_handle(device: torch.device) -> int:
    """The cudaStream_t the kernels must run on (torch's current stream), or 0 on CPU."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor_list(tensors, name: str, *, dtypes=FLOAT_DTYPES) -> torch.device:
    """Raises a clear exception unless `tensors` is a non-empty list of contiguous tensors of
    `dtypes` on one CPU or CUDA device, no two of them sharing memory. Returns the device."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors; got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} must be a non-empty list of tensors; got an empty list")
    device = None
    ranges = []
    for index, tensor in enumerate(tensors):
        where = f"{name}[{index}]"
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where} must be a torch.Tensor; got {type(tensor).__name__}")
        if tensor.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{where} must have dtype {allowed}; got {str(tensor.dtype).replace('torch.', '')}")
        if tensor.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{where} must be on a CPU or CUDA device; got {tensor.device}")
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise RuntimeError(
                f"{where} is on {tensor.device} but {name}[0] is on {device}; all tensors must be on one device")
        if not tensor.is_contiguous():
            raise ValueError(
                f"{where} must be contiguous; got shape {tuple(tensor.shape)} with strides {tensor.stride()}")
        if tensor.numel() > 0 and not torch.compiler.is_compiling():
            start = tensor.data_ptr()
            ranges.append((start, start + tensor.numel() * tensor.element_size(), index))
    # In-place kernels over tensors that share memory would race and update shared elements twice.
    ranges.sort()
    for (_, previous_end, previous), (start, _, index) in zip(ranges, ranges[1:]):
        if start < previous_end:
            first, second = sorted((previous, index))
            raise ValueError(f"{name}[{second}] overlaps {name}[{first}] in memory; each tensor must have its own memory")
    return device


def check_scalar_tensor(value: torch.Tensor, name: str, device: torch.device, dtypes) -> None:
    if value.numel() != 1:
        raise ValueError(f"{name} must hold exactly one element; got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(value.dtype).replace('torch.', '')}")
    if value.device != device:
        raise RuntimeError(f"{name} is on {value.device} but the parameters are on {device}; it must be on {device}")
