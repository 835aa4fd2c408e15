"""How a family's op reaches the torch-free core: one decorator registers a native entry point as a
`torch.library` custom op (namespace `llmkernels`), with DLPack capsules and torch's current stream.

    @native_op("mezo_sweep", mutates_args=("params",))
    def _sweep(params: List[torch.Tensor], seed: int, scale: float) -> None:
        '''In place: params += scale * z.'''

    @native_op("some_matmul")
    def _matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])      # the output, allocated by torch

The decorated function declares the op: its annotated signature is the op's schema, and its body
allocates and returns the outputs (None for an in-place op). It runs for real tensors, before the
native call, and for fake tensors as the op's fake implementation (torch.compile, torch.export), so
the shapes are written once. The native function `_C.<name>` receives the op's arguments in order
(tensors as DLPack capsules, tensor lists as lists of capsules, None as None), then the outputs as
capsules, then the cudaStream_t of torch's current stream on the operands' device (0 on CPU).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch
from torch.utils.dlpack import to_dlpack

from ._ext import C

NAMESPACE = "llmkernels"


def capsule(tensor: torch.Tensor):
    """A borrowed DLPack view of `tensor` (~0.3 us; the capsule keeps the tensor alive).
    `to_dlpack` accepts tensors that require grad (unlike `Tensor.__dlpack__`), so no detach()
    (another 0.5 us per tensor, 100 us per sweep over a 200-tensor model)."""
    return to_dlpack(tensor)


def _to_native(value):
    if isinstance(value, torch.Tensor):
        return capsule(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return [capsule(tensor) for tensor in value]
    return value


def _first_tensor(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0]
    return None


def stream_handle(device: torch.device) -> int:
    """The cudaStream_t the kernels must run on (torch's current stream), or 0 on CPU."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def _plain_tensors(values) -> bool:
    """Every tensor among `values` (and inside lists) is a plain CPU or CUDA tensor or parameter with
    no autograd to record (grad off, or no tensor requiring it): nothing for torch's dispatcher to do
    but call us. (Meta tensors and functorch's wrappers are plain tensors by type: their device, or the
    functorch interpreter stack, says otherwise.)"""
    grad = torch.is_grad_enabled()
    for value in values:
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                if (type(item) not in _PLAIN_TYPES or item.device.type not in _PLAIN_DEVICES
                        or (grad and item.requires_grad)):
                    return False
    return True


def _dispatcher_needed() -> bool:
    """Something records or transforms the ops (torch.compile, torch.jit.trace, a torch function or
    dispatch mode such as FakeTensorMode or FlopCounterMode, a functorch transform such as vmap)."""
    return (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._functorch.peek_interpreter_stack() is not None)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_PLAIN_DEVICES = ("cpu", "cuda")


def native_op(name: str, *, mutates_args: Sequence[str] = ()) -> Callable:
    """Decorator: registers `llmkernels::<name>`, implemented by `_C.<name>` (see the module doc).

    Returns the function the Python layer calls. In plain eager calls (not compiling, no torch
    function or dispatch mode active, every tensor a plain tensor or parameter, no autograd to
    record) it runs the implementation directly, as torch's dispatcher would, without the custom op's
    dispatch (about 100 us a call in torch 2.13, more than a small kernel takes); mutated tensors get
    their version counters bumped as the op would. Anything else (torch.compile, torch.jit.trace, fake
    or meta tensors, FlopCounterMode, vmap and other functorch transforms, tensors requiring grad) goes
    through the registered op, `call.op`."""
    def decorate(declare: Callable):
        native = getattr(C, name)
        signature = inspect.signature(declare)
        parameters = list(signature.parameters.values())
        mutated = [i for i, p in enumerate(parameters) if p.name in mutates_args]

        def run(arguments):
            outputs = declare(*arguments)
            output_list = [] if outputs is None else list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            anchor = _first_tensor(arguments + output_list)
            stream = stream_handle(anchor.device) if anchor is not None else 0
            native(*[_to_native(a) for a in arguments], *[capsule(o) for o in output_list], stream)
            return outputs

        @functools.wraps(declare)
        def implementation(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return run(list(bound.arguments.values()))

        op = torch.library.custom_op(f"{NAMESPACE}::{name}", implementation, mutates_args=tuple(mutates_args))
        op.register_fake(declare)

        defaults = [p.default for p in parameters]

        @functools.wraps(declare)
        def call(*args, **kwargs):
            if len(args) < len(parameters) and not kwargs and all(d is not inspect.Parameter.empty
                                                                  for d in defaults[len(args):]):
                args = args + tuple(defaults[len(args):])
            if kwargs or len(args) != len(parameters) or _dispatcher_needed() or not _plain_tensors(args):
                return op(*args, **kwargs)
            outputs = run(list(args))
            for i in mutated:
                value = args[i]
                tensors = [t for t in (value if isinstance(value, (list, tuple)) else (value,)) if t is not None]
                if tensors:
                    torch.autograd.graph.increment_version(tensors)
            return outputs

        call.op = op
        return call
    return decorate
