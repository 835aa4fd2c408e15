"""Quantized GEMM (csrc/quant/, docs/quant.md).

    w4 = quantize_int4(linear.weight, group_size=128)        # Int4Weight: packed codes, scales, zeros
    y = int4_linear(x, w4, bias)                              # W4A16
    w8 = quantize_int8(linear.weight)                         # Int8Weight: per-channel int8
    y = int8_linear(x, w8, bias)                              # W8A8: x quantized per token by one kernel
    y = int8_linear(x, w8, bias, activations="fp")            # W8A16
    quantize_model_(model, bits=4)                            # every nn.Linear but lm_head, in place

The int4 format is group-wise along K (groups of 32, 64, 128 or one per row), symmetric or with
4-bit zero points, 16-bit scales, packed in the layout of common/quant_format.h (`pack_int4` /
`unpack_int4`); the int8 weights are per output channel (optionally with SmoothQuant factors), the
activations per token. CPU kernels and CUDA kernels (the GEMM core with a dequantizing B loader, or
int8 tiles); x is (..., K) with any number of rows, N and K multiples of 8, K a multiple of the group.
"""

import dataclasses
from typing import Optional, Tuple

import torch

from ._ext import C
from ._ops import native_op
from ._validate import device_kernels, rows_aligned

__all__ = ["Int4Weight", "Int8Weight", "quantize_int4", "quantize_int8", "quantize_per_token", "dequantize",
           "int4_linear", "int8_linear", "int8_matmul", "pack_int4", "unpack_int4", "Int4Linear", "Int8Linear",
           "quantize_model_"]

GROUP_SIZES = (32, 64, 128, -1)


@native_op("quant_pack_int4")
def _pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 (N, K) in [0, 15] -> packed int32 (N / 8, ceil(K / 32), 32)."""
    n, k = codes.shape
    return torch.empty((n // 8, (k + 31) // 32, 32), dtype=torch.int32, device=codes.device)


@native_op("quant_unpack_int4")
def _unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """packed int32 (N / 8, ceil(K / 32), 32) -> codes uint8 (N, K)."""
    return torch.empty((packed.shape[0] * 8, k), dtype=torch.uint8, device=packed.device)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K), each in [0, 15], N and K multiples of 8 -> the packed int32 words of
    docs/quant.md (the W4A16 kernel's layout: one word a lane per 8 x 32 block)."""
    if codes.device.type == "cuda" and codes.dtype == torch.uint8 and codes.numel() and not torch.compiler.is_compiling():
        # (the native layer checks host memory itself; here one device-wide max, one sync)
        top = int(codes.max())
        if top > 15:
            raise ValueError(f"codes must hold 4-bit codes in [0, 15]; got a code of {top}")
    return _pack(codes.contiguous())


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_int4: the (N, K) uint8 codes."""
    return _unpack(packed.contiguous(), int(k))


@dataclasses.dataclass
class Int4Weight:
    """An int4-quantized (out_features, in_features) weight: w[n, k] ~ (q[n, k] - zeros[g, n]) * scales[g, n]
    with g = k // group_size (one group when group_size is -1)."""
    packed: torch.Tensor        # int32 (N / 8, ceil(K / 32), 32)
    scales: torch.Tensor        # bf16 or fp16 (groups, N)
    zeros: torch.Tensor         # uint8 (groups, N), 4-bit values; 8 everywhere when symmetric
    group_size: int             # 32, 64, 128 or -1 (per channel)
    shape: Tuple[int, int]      # (N, K)
    symmetric: bool

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed, self.shape[1])

    def to(self, device) -> "Int4Weight":
        """The same weight with its tensors on `device`."""
        return dataclasses.replace(self, packed=self.packed.to(device), scales=self.scales.to(device),
                                   zeros=self.zeros.to(device))


@native_op("quant_quantize_int4")
def _quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool,
                   scale_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """packed int32 (N / 8, ceil(K / 32), 32), scales (groups, N) in scale_dtype, zeros uint8 (groups, N)."""
    n, k = w.shape
    groups = 1 if group_size == -1 else k // group_size
    return (torch.empty((n // 8, (k + 31) // 32, 32), dtype=torch.int32, device=w.device),
            torch.empty((groups, n), dtype=scale_dtype, device=w.device),
            torch.empty((groups, n), dtype=torch.uint8, device=w.device))


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  scale_dtype: torch.dtype = None) -> Int4Weight:
    """Group-wise int4 quantization of an (N, K) weight along K, by one kernel on the weight's device
    (CPU or CUDA): every element ends within half a step (its group's scale / 2) of its dequantized value.

    symmetric: scale = max|w| / 7 and zero point 8 (codes 1..15 for |w| <= max). Otherwise scale =
    (max - min) / 15 and a 4-bit zero point round(-min / scale) (min and max over the group, with 0
    included, so that zero is exact). Scales are bf16 or fp16 (default: w's dtype if 16-bit, else bf16),
    rounded up from the exact value. The same bits as llmkernels.reference.quant.quantize_int4 (torch ops)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"w must be a 2-D floating-point tensor (out_features, in_features); got "
                        f"{getattr(w, 'dtype', type(w).__name__)} of shape {tuple(getattr(w, 'shape', ()))}")
    n, k = w.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}; got {group_size}")
    if n % 8 or k % 8:
        raise ValueError(f"w's out_features and in_features must be multiples of 8; got shape {(n, k)}")
    size = k if group_size == -1 else group_size
    if k % size:
        raise ValueError(f"in_features ({k}) must be a multiple of group_size ({group_size})")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if scale_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"scale_dtype must be bfloat16 or float16; got {scale_dtype}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.float()
    packed, scales, zeros = _quantize_int4(w.detach().contiguous(), group_size, symmetric, scale_dtype)
    return Int4Weight(packed, scales, zeros, group_size, (n, k), symmetric)


def dequantize(weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight that an Int4Weight or Int8Weight represents, computed in float32, then
    `dtype`: (q - z) * s for int4, q * s / smooth for int8."""
    if isinstance(weight, Int8Weight):
        w = weight.data.float() * weight.scales[:, None]
        return (w / weight.smooth[None, :] if weight.smooth is not None else w).to(dtype)
    n, k = weight.shape
    size = k if weight.group_size == -1 else weight.group_size
    codes = weight.codes().float().reshape(n, k // size, size)
    scales, zeros = weight.scales.float().T, weight.zeros.float().T   # (N, groups)
    return ((codes - zeros[:, :, None]) * scales[:, :, None]).reshape(n, k).to(dtype)


# The CUDA W4A16 kernel splits K for M <= INT4_SPLIT_MAX_ROWS into at most INT4_SPLIT_MAX_RANGES
# ranges (csrc/quant/quant.h: int4_split_k); its float32 workspace is allocated at that bound (plain
# arithmetic that torch.compile traces), only where the CUDA kernel (or its emulation) runs.
INT4_SPLIT_MAX_ROWS, INT4_SPLIT_MAX_RANGES = C.quant_int4_split_limits()


@native_op("quant_int4_linear")
def _int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """out (M, N) in x's dtype, and the CUDA kernel's split-K workspace."""
    m, n = x.shape[0], packed.shape[0] * 8
    size = INT4_SPLIT_MAX_RANGES * m * n if device_kernels(x) and m <= INT4_SPLIT_MAX_ROWS else 0
    return (torch.empty((m, n), dtype=x.dtype, device=x.device),
            torch.empty((size,), dtype=torch.float32, device=x.device))


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A16: x (..., K) @ dequantize(weight)ᵀ (+ bias), float32 accumulation, in x's dtype (fp16,
    bf16; fp32 on the CPU). Any number of rows, including 1."""
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight must be an Int4Weight (llmkernels.quant.quantize_int4); got {type(weight).__name__}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be the weight's in_features {k}; got shape {tuple(x.shape)}")
    rows = rows_aligned(x.reshape(-1, k))
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},); got {tuple(bias.shape)}")
        bias = bias.float().contiguous()
    out, _ = _int4_linear(rows, weight.packed, weight.scales, weight.zeros, weight.group_size, bias)
    return out.reshape(*x.shape[:-1], n)


# -- int8 ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Int8Weight:
    """An int8 (out_features, in_features) weight with per-output-channel scales:
    w[n, k] ~ data[n, k] * scales[n] / smooth[k] (smooth: SmoothQuant's per-input-channel factors, the
    activations divided by them before their own quantization; None for plain W8A8 / W8A16)."""
    data: torch.Tensor                    # int8 (N, K), values in [-127, 127]
    scales: torch.Tensor                  # float32 (N,)
    smooth: Optional[torch.Tensor] = None  # float32 (K,) or None

    def to(self, device) -> "Int8Weight":
        """The same weight with its tensors on `device`."""
        return Int8Weight(self.data.to(device), self.scales.to(device),
                          None if self.smooth is None else self.smooth.to(device))


def quantize_int8(w: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> Int8Weight:
    """Per-output-channel symmetric int8 quantization of an (N, K) weight, of w * smooth when
    SmoothQuant factors (K,) are given (the activations are then divided by them): the per-token
    kernel (quantize_per_token) on the weight's rows, on its device. scale = max|row| / 127 in float32
    (1 for an all-zero row), codes round-half-even(w / scale) in float64, so every element is within
    half a step of code * scale (in float32 the division's rounding moved near-half values past it)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"w must be a 2-D floating-point tensor (out_features, in_features); got "
                        f"{getattr(w, 'dtype', type(w).__name__)} of shape {tuple(getattr(w, 'shape', ()))}")
    n, k = w.shape
    if n % 8 or k % 8:
        raise ValueError(f"w's out_features and in_features must be multiples of 8; got shape {(n, k)}")
    values = w.float()
    if smooth is not None:
        if smooth.shape != (k,) or not (smooth > 0).all():
            raise ValueError(f"smooth must be ({k},) positive factors; got shape {tuple(smooth.shape)}")
        smooth = smooth.float().contiguous()
        values = values * smooth[None, :]
    data, scale = _quantize_per_token(values.detach().contiguous(), None)
    return Int8Weight(data, scale, smooth)


@native_op("quant_quantize_per_token")
def _quantize_per_token(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """codes int8 (M, K), scales float32 (M,)."""
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty((x.shape[0],), dtype=torch.float32, device=x.device))


def quantize_per_token(x: torch.Tensor, smooth: Optional[torch.Tensor] = None):
    """Dynamic per-token (per-row) symmetric int8 quantization of activations x (..., K), divided by
    SmoothQuant factors `smooth` (K,) first when given: returns (int8 codes like x, float32 scales
    (..., 1)), each element within half a step of code * scale. One kernel (the CPU's or the CUDA's),
    with the arithmetic of the weights' quantization: scale = max|v| / 127 in float32 (1 for an all-zero
    row, NaN for a row holding a NaN), code = round-half-even(v / scale) in float64, clamped to 127."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError(f"x must be a floating-point tensor of at least one dimension; got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    k = x.shape[-1]
    if smooth is not None:
        if not isinstance(smooth, torch.Tensor) or tuple(smooth.shape) != (k,):
            raise ValueError(f"smooth must have shape ({k},); got {tuple(getattr(smooth, 'shape', ()))}")
        smooth = smooth.float().contiguous()
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    codes, scales = _quantize_per_token(rows, smooth)
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], 1)


@native_op("quant_int8_matmul")
def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int32 (M, N)."""
    return torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)


@native_op("quant_int8_linear")
def _int8_linear(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                 bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """out (M, N) in out_dtype."""
    return torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W8A8's integer core: a (M, K) int8 times b (N, K) int8 transposed, exact int32 (M, N)."""
    return _int8_matmul(a.contiguous(), b.contiguous())


@native_op("quant_int8_weight_linear")
def _int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """out (M, N) in x's dtype, and the CUDA kernel's split-K workspace (as W4A16's)."""
    m, n = x.shape[0], weight.shape[0]
    size = INT4_SPLIT_MAX_RANGES * m * n if device_kernels(x) and m <= INT4_SPLIT_MAX_ROWS else 0
    return (torch.empty((m, n), dtype=x.dtype, device=x.device),
            torch.empty((size,), dtype=torch.float32, device=x.device))


ACTIVATIONS = ("int8", "fp")


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: Optional[torch.Tensor] = None,
                activations: str = "int8") -> torch.Tensor:
    """x (..., K) times an int8 weight, plus bias, in x's dtype.

    activations="int8" (W8A8): x quantized per token by one kernel (after division by the weight's
    SmoothQuant factors), the exact int32 product with the int8 weight on the int8 tensor cores,
    scaled per token and per channel. activations="fp" (W8A16): x as it is times the integer codes
    (converted exactly to x's dtype), scaled per channel in float32; a weight with SmoothQuant factors
    is refused there (they belong to W8A8's activations)."""
    if not isinstance(weight, Int8Weight):
        raise TypeError(f"weight must be an Int8Weight (llmkernels.quant.quantize_int8); got {type(weight).__name__}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}; got {activations!r}")
    n, k = weight.data.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be the weight's in_features {k}; got shape {tuple(x.shape)}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},); got {tuple(bias.shape)}")
        bias = bias.float().contiguous()
    if activations == "fp":
        if weight.smooth is not None:
            raise ValueError("int8_linear(activations='fp') takes a weight quantized without SmoothQuant factors "
                             "(quantize_int8(w)); this one has `smooth`, which belongs to W8A8 (activations='int8')")
        out, _ = _int8_weight_linear(rows_aligned(x.reshape(-1, k)), weight.data, weight.scales, bias)
        return out.reshape(*x.shape[:-1], n)
    codes, scales = quantize_per_token(x.reshape(-1, k), weight.smooth)
    out = _int8_linear(codes.contiguous(), scales.reshape(-1).contiguous(), weight.data, weight.scales, bias, x.dtype)
    return out.reshape(*x.shape[:-1], n)


# -- linear layers ------------------------------------------------------------------------------------

class Int4Linear(torch.nn.Module):
    """A drop-in nn.Linear with an int4 weight (W4A16): `Int4Linear.from_linear(linear, group_size=128)`.
    Its buffers (packed, scales, zeros, bias) are its state_dict: an Int4Linear built with the same
    arguments loads it back."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = False, scale_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}; got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("packed", torch.zeros((out_features // 8, (in_features + 31) // 32, 32),
                                                   dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones((groups, out_features), dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.zeros((groups, out_features), dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group_size: int = 128, symmetric: bool = False) -> "Int4Linear":
        weight = quantize_int4(linear.weight.detach(), group_size=group_size, symmetric=symmetric)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, symmetric,
                     weight.scales.dtype, linear.weight.device)
        module.packed.copy_(weight.packed)
        module.scales.copy_(weight.scales)
        module.zeros.copy_(weight.zeros)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def quantized_weight(self) -> Int4Weight:
        return Int4Weight(self.packed, self.scales, self.zeros, self.group_size, (self.out_features, self.in_features),
                          self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, bias={self.bias is not None}")


class Int8Linear(torch.nn.Module):
    """A drop-in nn.Linear with an int8 weight: dynamically quantized int8 activations (W8A8,
    activations="int8") or activations as they are (W8A16, "fp"): `Int8Linear.from_linear(linear,
    smooth=None, activations="int8")`. Buffers: data, scales, smooth (or None), bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, smooth: bool = False, device=None,
                 activations: str = "int8"):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}; got {activations!r}")
        if smooth and activations == "fp":
            raise ValueError("SmoothQuant factors belong to W8A8 (activations='int8'), not W8A16")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("data", torch.zeros((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device))
        self.register_buffer("smooth", torch.ones(in_features, device=device) if smooth else None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, smooth: Optional[torch.Tensor] = None,
                    activations: str = "int8") -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, smooth is not None,
                     linear.weight.device, activations)
        weight = quantize_int8(linear.weight.detach(), smooth=smooth)
        module.data.copy_(weight.data)
        module.scales.copy_(weight.scales)
        if smooth is not None:
            module.smooth.copy_(weight.smooth)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (float(): model.to(torch.bfloat16) casts floating buffers; the scales stay float32 to the kernel)
        smooth = None if self.smooth is None else self.smooth.float()
        return int8_linear(x, Int8Weight(self.data, self.scales.float(), smooth), self.bias, self.activations)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, activations={self.activations}, "
                f"smooth={self.smooth is not None}, bias={self.bias is not None}")


def quantize_model_(model: torch.nn.Module, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                    skip=("lm_head",), activations: str = "int8") -> torch.nn.Module:
    """Replaces, in place, every nn.Linear of `model` whose name (or last name component) is not in
    `skip` with an Int4Linear (bits=4) or Int8Linear (bits=8, with `activations` "int8" for W8A8 or
    "fp" for W8A16). A layer whose shape the format cannot
    take (features not multiples of 8, in_features not a multiple of group_size) raises ValueError
    naming it: add it to `skip` to keep it in full precision. Returns the model."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8; got {bits}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}; got {activations!r}")
    skip = set(skip)
    targets = []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or name in skip or name.rsplit(".", 1)[-1] in skip:
            continue
        n, k = module.out_features, module.in_features
        size = k if group_size == -1 else group_size
        if n % 8 or k % 8 or (bits == 4 and k % size):
            raise ValueError(f"layer {name!r} ({k} -> {n}) cannot be quantized to int{bits}"
                             f"{f' with group_size {group_size}' if bits == 4 else ''}; add it to skip")
        targets.append((name, module))
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = (Int4Linear.from_linear(module, group_size, symmetric) if bits == 4
                       else Int8Linear.from_linear(module, activations=activations))
        setattr(parent, child, replacement)
    return model
