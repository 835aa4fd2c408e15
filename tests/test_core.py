"""The pieces every family shares: the native core's tensor checks and segment search, the CUDA
driver staying untouched at import, the "CUDA usable" answer, and the argument validators."""
from __future__ import annotations

import bisect
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import llmkernels
from llmkernels import _validate as check
from llmkernels._ext import C

import helpers


def test_find_segment_matches_bisect_with_empty_segments():
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        sizes = torch.randint(0, 4, (1 + trial % 17,), generator=generator).tolist()
        sizes[-1] += 1   # at least one item
        begins = [0]
        for size in sizes:
            begins.append(begins[-1] + size)
        for item in range(begins[-1]):
            expected = bisect.bisect_right(begins, item) - 1   # last segment starting at or before item
            assert C.testing.find_segment(begins, item) == expected, (begins, item)
            assert begins[expected] <= item < begins[expected + 1]   # never an empty segment
    with pytest.raises(ValueError):
        C.testing.find_segment([0, 3], 3)


def layouts():
    base = torch.randn(2, 3, 4, 5)
    return {
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed": base.transpose(1, 3),
        "size-1 dims": torch.randn(3, 1, 4)[:, :, :],
        "sliced": base[:, :, ::2],
        "expanded": torch.randn(3, 1).expand(3, 4),
        "offset view": torch.randn(40)[7:27].view(4, 5),
        "empty": torch.randn(2, 0, 3),
        "0-dim": torch.tensor(1.5),
    }


def fills_its_memory_once(tensor: torch.Tensor) -> bool:
    """Brute force: the elements' memory offsets are exactly 0 .. numel - 1, each once."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(tensor.shape, tensor.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return sorted(offsets.flatten().tolist()) == list(range(tensor.numel()))


@pytest.mark.parametrize("name", list(layouts()))
def test_tensor_view_density_matches_brute_force(name):
    tensor = layouts()[name]
    contiguous, dense = C.testing.layout(to_dlpack(tensor))
    assert contiguous == tensor.is_contiguous()
    assert dense == fills_its_memory_once(tensor)


def test_tensor_view_shape_checks_name_the_argument():
    capsule = to_dlpack(torch.zeros(2, 3, dtype=torch.bfloat16))
    C.testing.check_view(capsule, "x", [2, -1], "bfloat16")
    with pytest.raises(ValueError, match=r"^x must have shape \(2, 4\); got \(2, 3\)$"):
        C.testing.check_view(to_dlpack(torch.zeros(2, 3)), "x", [2, 4], "float32")
    with pytest.raises(ValueError, match=r"^x must have shape \(\*,\); got \(2, 3\)$"):
        C.testing.check_view(to_dlpack(torch.zeros(2, 3)), "x", [-1], "float32")
    with pytest.raises(TypeError, match=r"^x holds float32, read as bfloat16$"):
        C.testing.check_view(to_dlpack(torch.zeros(2, 3)), "x", [2, 3], "bfloat16")


IMPORT_PROBE = """
import sys, torch
def libcuda_mapped():
    with open("/proc/self/maps") as maps:
        return "libcuda.so" in maps.read()
before = libcuda_mapped()
import llmkernels, llmkernels.mezo, llmkernels.reference
from llmkernels._ext import C
print(C.testing.cuda_driver_queries(), int(before), int(libcuda_mapped()))
llmkernels.build_info()
print(C.testing.cuda_driver_queries())
"""


def test_import_does_not_touch_the_cuda_driver():
    # Forked DataLoader workers and import time depend on it; build_info() and the ops may.
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stderr
    at_import, after_build_info = result.stdout.split("\n")[:2]
    queries, libcuda_before, libcuda_after = map(int, at_import.split())
    assert queries == 0, "importing llmkernels queried the CUDA runtime/driver"
    if not libcuda_before:   # torch did not load the driver library: llmkernels must not either
        assert not libcuda_after, "importing llmkernels loaded libcuda"
    if llmkernels.build_info()["cuda_compiled"]:
        assert int(after_build_info) > 0   # the counter counts: build_info() does query


def test_cuda_usable_is_the_library_answer():
    reason = llmkernels.cuda_unusable_reason()
    assert llmkernels.cuda_usable() is (reason is None) is helpers.CUDA_USABLE
    if reason is not None:
        assert isinstance(reason, str) and reason
    if not torch.cuda.is_available():
        assert not llmkernels.cuda_usable()


@pytest.mark.cuda
def test_cuda_device_without_index_is_the_current_device():
    assert check.normalize_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert check.normalize_device(torch.device("cuda:0")) == torch.device("cuda:0")


def test_float32_values_are_checked_after_rounding():
    assert check.float32_value(3.0e38, "x") == 3.0e38
    for bad in (1e39, -1e39, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="x must be finite in float32"):
            check.float32_value(bad, "x")
    with pytest.raises(ValueError, match=r"x must be > 0 \(after rounding to float32\); got 0.0"):
        check.float32_value(0.0, "x", positive=True)
    with pytest.raises(ValueError, match="x must be >= 0; got -1.0"):
        check.float32_value(-1, "x", minimum=0.0)
    with pytest.raises(ValueError, match=r"x must be > 0 \(after rounding to float32\); got 1e-46"):
        check.float32_value(1e-46, "x", positive=True)   # 0 in float32
    with pytest.raises(TypeError, match="x must be a real number; got bool"):
        check.float32_value(True, "x")
    with pytest.raises(TypeError, match="x must be a real number; got Tensor"):
        check.float32_value(torch.tensor(1.0), "x")


def test_seeds_are_64_bit_patterns():
    assert check.seed(-1, "seed", torch.device("cpu")) == (-1, None)
    assert check.seed(2**64 - 1, "seed", torch.device("cpu")) == (-1, None)
    assert check.seed(2**63, "seed", torch.device("cpu")) == (-2**63, None)
    with pytest.raises(ValueError, match=r"seed must be an int in \[-9223372036854775808, "):
        check.seed(-2**63 - 1, "seed", torch.device("cpu"))
    with pytest.raises(TypeError, match="seed must have dtype int64; got int32"):
        check.seed(torch.tensor(1, dtype=torch.int32), "seed", torch.device("cpu"))


# -- the custom ops' eager fast path (_ops.native_op) ----------------------------------------------

def test_native_op_fast_path_and_dispatched_path_agree():
    """A plain eager call skips torch's dispatcher; the registered op (`call.op`) gives the same result,
    and a mutated tensor's version counter moves either way (autograd's check of in-place changes)."""
    from llmkernels import _gemm, quant
    from llmkernels._gemm import ACTIVATIONS, _gemm as gemm_op
    x = torch.randn(5, 64).bfloat16()
    q = quant.quantize_int4(torch.randn(16, 64), group_size=32, scale_dtype=torch.bfloat16)
    fast, _ = quant._int4_linear(x, q.packed, q.scales, q.zeros, 32, None)
    slow, _ = quant._int4_linear.op(x, q.packed, q.scales, q.zeros, 32, None)
    assert torch.equal(fast, slow)
    w = torch.randn(24, 64).bfloat16()
    outs = []
    for call in (gemm_op, gemm_op.op):
        out = torch.full((5, 24), float("nan"), dtype=torch.bfloat16)
        before = out._version
        call(x, None, w, None, None, None, ACTIVATIONS["none"], False, out, _gemm.workspace(5, 24, 64, x.device))
        assert out._version > before
        outs.append(out)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


def test_native_op_takes_the_dispatcher_for_fake_tensors_and_modes():
    """Fake tensors (torch.export, meta-style shape propagation) and dispatch modes (FlopCounterMode)
    must see the op, not a native call on data that does not exist."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from llmkernels import quant
    q = quant.quantize_int4(torch.randn(16, 64), group_size=32, scale_dtype=torch.bfloat16)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(3, 64).bfloat16())
        packed, scales, zeros = (mode.from_tensor(t) for t in (q.packed, q.scales, q.zeros))
        out, _ = quant._int4_linear(x, packed, scales, zeros, 32, None)
        assert out.shape == (3, 16) and out.dtype == torch.bfloat16
    with FlopCounterMode(display=False):
        out, _ = quant._int4_linear(torch.randn(3, 64).bfloat16(), q.packed, q.scales, q.zeros, 32, None)
    assert torch.isfinite(out).all()


def test_native_op_takes_the_dispatcher_for_tracing_meta_and_vmap():
    """torch.jit.trace must record the op (not the empty outputs), meta tensors must get shapes, vmap
    must batch through the op's fallback: none of these may reach the native call directly."""
    from llmkernels import moe, quant
    q = quant.quantize_int4(torch.randn(16, 64), group_size=32, scale_dtype=torch.bfloat16)
    x = torch.randn(3, 64).bfloat16()
    traced = torch.jit.trace(lambda x: quant.int4_linear(x, q), (x,), check_trace=False)
    assert torch.equal(traced(x), quant.int4_linear(x, q))
    weights, ids, stats = moe.route(torch.randn(5, 8, device="meta"), 2)
    assert weights.shape == (5, 2) and ids.device.type == "meta"
    logits = torch.randn(4, 5, 8)
    batched = torch.vmap(lambda l: moe._route(l, 2, True, 0)[1])(logits)
    assert torch.equal(batched, torch.stack([moe.route(l, 2)[1] for l in logits]))


def test_info_command_reports_the_build_and_the_verdict():
    """`python -m llmkernels info` (and `doctor`): the build's CUDA architectures as build_info() has
    them, torch's version, and why the CUDA kernels cannot run when they cannot (the same reason the
    ops raise with)."""
    info = llmkernels.build_info()
    for command in ("info", "doctor"):
        result = subprocess.run([sys.executable, "-m", "llmkernels", command], capture_output=True, text=True,
                                timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)))
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert f"llmkernels {info['version']}" in out and f"torch {torch.__version__}" in out
        assert (info["cuda_archs"] or "none (a CPU-only build)") in out
        if info["gpu_usable"]:
            assert "CUDA kernels: usable" in out
        else:
            assert f"not usable here: {llmkernels.cuda_unusable_reason()}" in out
    if info["cuda_compiled"]:   # "sm_80, ..., compute_90 (PTX)": every SASS or PTX target named
        assert all(part.startswith(("sm_", "compute_")) for part in info["cuda_archs"].split(", "))
    else:
        assert "release wheel" in llmkernels.cuda_unusable_reason()
