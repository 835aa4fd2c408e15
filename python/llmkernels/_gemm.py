"""The GEMM core (csrc/gemm/, docs/gemm.md), for tests and benchmarks: not public API.

    out = epilogue(x @ weight.T)       weight (N, K) like nn.Linear's, fp32 accumulation

with the epilogue, per element, in fp32: v = acc * row_scale[i] * col_scale[j] + bias[j], then an
activation (none, silu, gelu (erf), or swiglu: columns are (gate, up) pairs and the output has N / 2
columns, silu(gate) * up), then out = v, or out += v into `accumulate_into`. The quantized GEMM, MoE
and LoRA families are this core with other loaders and epilogues; users of the plain case have
torch.matmul.

Inputs: bfloat16 or float16 (float32 too on CPU tensors, run by the CPU kernel). K and N are
multiples of 8. With `rows` (int32, (M,)), x is (T, K) and row i of A is x[rows[i]] (gathered rows,
repeats allowed); without, x is (..., K) and its leading dimensions are flattened.
"""
from typing import Optional

import torch

from . import _validate as check
from ._ext import C
from ._ops import native_op

ACTIVATIONS = {"none": 0, "silu": 1, "gelu": 2, "swiglu": 3}
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@native_op("gemm", mutates_args=("out", "workspace"))
def _gemm(
    a: torch.Tensor,
    a_rows: Optional[torch.Tensor],
    b: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    col_scale: Optional[torch.Tensor],
    activation: int,
    accumulate: bool,
    out: torch.Tensor,
    workspace: torch.Tensor,
    b_k_major: bool = False,
) -> None:
    """In place: out (=, or += when accumulate) epilogue(a[a_rows] @ b.T), or epilogue(a[a_rows] @ b)
    with b_k_major (b (K, N)). `workspace`: float32 scratch of at least workspace_elements(m, n, k),
    the CUDA kernel's split-K partial sums for small M."""


# The CUDA kernel splits K only for M <= SPLIT_MAX_ROWS, into at most SPLIT_MAX_RANGES ranges
# (csrc/gemm/gemm.h: split_k). Read once at import, so the size below is plain arithmetic that
# torch.compile traces for any (symbolic) M; the native core refuses a workspace that is too small.
SPLIT_MAX_ROWS, SPLIT_MAX_RANGES = C.gemm_split_limits()


def workspace_elements(m: int, n: int, k: int) -> int:
    """float32 elements of split-K scratch to allocate for an (m, n, k) problem: the bound
    SPLIT_MAX_RANGES * m * n for small m (what the kernel uses is C.gemm_workspace(m, n, k), at
    most that; torch.empty does not touch the rest), 0 otherwise."""
    return SPLIT_MAX_RANGES * m * n if m <= SPLIT_MAX_ROWS else 0


def workspace(m: int, n: int, k: int, device: torch.device) -> torch.Tensor:
    return torch.empty(workspace_elements(m, n, k), dtype=torch.float32, device=device)


# Not differentiable: the core serves inference paths and the other families' kernels; the op has no
# autograd formula (torch raises if a gradient is asked for through it).


def _float32_vector(value, name: str, size: int, size_name: str, device: torch.device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    check.check_tensor(value, name, dtypes=(torch.float32,))
    check.check_same_device(value, name, device, "x")
    if tuple(value.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},) ({size_name}); got {tuple(value.shape)}")
    return value


def gemm(x: torch.Tensor, weight: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
         row_scale: Optional[torch.Tensor] = None, col_scale: Optional[torch.Tensor] = None,
         activation: str = "none", accumulate_into: Optional[torch.Tensor] = None,
         rows: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
         transposed_weight: bool = False) -> torch.Tensor:
    """epilogue(x @ weight.T) (see the module doc), or epilogue(x @ weight) with `transposed_weight`
    (weight (K, N), e.g. a linear layer's weight in its input gradient). Returns a new (..., N) tensor
    ((..., N / 2) for swiglu; (M, ...) with `rows`) of `out_dtype` (x's dtype, or float32), or
    `accumulate_into`, updated in place, when given (its dtype is then the output dtype)."""
    check.check_tensor(x, "x", dtypes=INPUT_DTYPES)
    check.check_tensor(weight, "weight", dtypes=INPUT_DTYPES)
    device = x.device
    check.check_same_device(weight, "weight", device, "x")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {check.dtype_names([x.dtype])}; got "
                        f"{check.dtype_names([weight.dtype])}")
    if x.dtype == torch.float32 and device.type != "cpu":
        raise TypeError(f"x must be bfloat16 or float16 on {device} (float32 runs on the CPU kernel only); "
                        "got float32")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape {'(K, N)' if transposed_weight else '(N, K)'}; got {tuple(weight.shape)}")
    n, k = reversed(weight.shape) if transposed_weight else weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., K) with K = {k} (weight's {'rows' if transposed_weight else 'columns'}); "
                         f"got {tuple(x.shape)}")
    if k == 0 or k % 8:
        raise ValueError(f"K must be a positive multiple of 8 (got {k}): x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if n == 0 or n % 8:
        raise ValueError(f"N must be a positive multiple of 8 (got {n}): weight has shape {tuple(weight.shape)}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")
    columns = n // 2 if activation == "swiglu" else n

    if rows is not None:
        check.check_tensor(rows, "rows", dtypes=(torch.int32,))
        check.check_same_device(rows, "rows", device, "x")
        if rows.dim() != 1:
            raise ValueError(f"rows must have shape (M,); got {tuple(rows.shape)}")
        if x.dim() != 2:
            raise ValueError(f"with rows, x must have shape (T, K); got {tuple(x.shape)}")
        a, lead = x, (rows.shape[0],)
    else:
        a, lead = x.reshape(-1, k), tuple(x.shape[:-1])
    m = rows.shape[0] if rows is not None else a.shape[0]

    bias = _float32_vector(bias, "bias", n, "N", device)
    row_scale = _float32_vector(row_scale, "row_scale", m, "M, the rows of A", device)
    col_scale = _float32_vector(col_scale, "col_scale", n, "N", device)

    if out_dtype is not None and out_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"out_dtype must be x's dtype {check.dtype_names([x.dtype])} or float32; got {out_dtype}")
    if accumulate_into is None:
        out = torch.empty((m, columns), dtype=out_dtype or x.dtype, device=device)
        _gemm(a, rows, weight, bias, row_scale, col_scale, ACTIVATIONS[activation], False, out,
              workspace(m, n, k, device), bool(transposed_weight))
        return out.view(*lead, columns)

    check.check_tensor(accumulate_into, "accumulate_into", dtypes=(x.dtype, torch.float32))
    check.check_same_device(accumulate_into, "accumulate_into", device, "x")
    if out_dtype is not None and accumulate_into.dtype != out_dtype:
        raise TypeError(f"accumulate_into has dtype {check.dtype_names([accumulate_into.dtype])} but out_dtype is "
                        f"{out_dtype}; they must agree")
    if tuple(accumulate_into.shape) != (*lead, columns):
        raise ValueError(f"accumulate_into must have shape {(*lead, columns)}; got {tuple(accumulate_into.shape)}")
    if accumulate_into.dim() == 2:
        out = accumulate_into
    else:
        if not accumulate_into.is_contiguous():   # a reshape would copy, and the sum would be lost
            raise ValueError(f"accumulate_into must be contiguous; got shape {tuple(accumulate_into.shape)} "
                             f"with strides {accumulate_into.stride()}")
        out = accumulate_into.view(m, columns)
    _gemm(a, rows, weight, bias, row_scale, col_scale, ACTIVATIONS[activation], True, out, workspace(m, n, k, device),
          bool(transposed_weight))
    return accumulate_into
