"""Quantized GEMM (issue 11, in progress): the int4 format so far. The packed layout against the PTX
ISA's mma.m16n8k16 B-fragment table written out here (not through the library's own position
function), pack/unpack as exact inverses, quantization's half-step error bound, and dequantize
against the reference's reading of the format (llmkernels.reference.quant)."""
import contextlib

import pytest
import torch

import llmkernels
from llmkernels import quant
from llmkernels.reference import quant as reference

from helpers import assert_parity, generator, randn

SHAPES = [(8, 8), (8, 32), (16, 40), (24, 72), (64, 2752 // 8), (40, 136)]   # (N, K): K tails of the 32-blocks


def random_codes(n, k, seed=0):
    return torch.randint(0, 16, (n, k), generator=generator(seed), dtype=torch.uint8)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_and_unpack_are_exact_inverses(device, shape):
    codes = random_codes(*shape, seed=shape[1]).to(device)
    packed = quant.pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0] // 8, (shape[1] + 31) // 32, 32)
    assert torch.equal(quant.unpack_int4(packed, shape[1]), codes)
    assert torch.equal(packed.cpu(), table_pack(codes.cpu()))


def table_pack(codes):
    """The packed words built from the PTX ISA's mma.m16n8k16 B-fragment table (see the next test),
    in plain Python: lane 4g + t of block (n / 8, k / 32) holds column g's k = 32 kb + 16 half + 8 upper
    + 2t (+ 1) at bits 4r (+ 16), r = 2 half + upper; past K, code 0."""
    n, k = codes.shape
    k_blocks = (k + 31) // 32
    padded = torch.zeros(n, 32 * k_blocks, dtype=torch.int64)
    padded[:, :k] = codes.long()
    blocks = padded.reshape(n // 8, 8, k_blocks, 2, 2, 4, 2)   # (nb, g, kb, half, upper, t, odd)
    words = torch.zeros(n // 8, k_blocks, 8, 4, dtype=torch.int64)   # (nb, kb, g, t)
    for half in range(2):
        for upper in range(2):
            for odd in range(2):
                nibble = blocks[:, :, :, half, upper, :, odd].permute(0, 2, 1, 3)   # (nb, kb, g, t)
                words |= nibble << (4 * (2 * half + upper) + 16 * odd)
    words = words.reshape(n // 8, k_blocks, 32)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def test_pack_refuses_codes_past_15(device):
    codes = random_codes(8, 16, seed=1)
    codes[3, 5] = 16
    with pytest.raises(ValueError, match=r"codes must hold 4-bit codes in \[0, 15\]; got .*16"):
        quant.pack_int4(codes.to(device))


def test_packed_words_hold_the_mma_b_fragments():
    """PTX ISA, mma.m16n8k16 (16-bit types), B fragment: lane l = 4g + t holds b0 = (k 2t, 2t + 1) and
    b1 = (k 2t + 8, 2t + 9) of column n = g, the lower k in the lower half. docs/quant.md: a lane's
    word holds registers r = 0, 1 (first k16 half: b0, b1) and 2, 3 (second half), register r's
    lower element at bits 4r and its upper at 4r + 16."""
    n, k = 16, 96
    codes = random_codes(n, k, seed=5)
    words = quant.pack_int4(codes)
    for n_block in range(n // 8):
        for k_block in range((k + 31) // 32):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                word = int(words[n_block, k_block, lane]) & 0xFFFFFFFF
                for r in range(4):
                    half, upper = r // 2, r % 2
                    k0 = 32 * k_block + 16 * half + 2 * t + 8 * upper
                    row = 8 * n_block + g
                    assert (word >> (4 * r)) & 0xF == codes[row, k0], (n_block, k_block, lane, r)
                    assert (word >> (4 * r + 16)) & 0xF == codes[row, k0 + 1], (n_block, k_block, lane, r)


def test_padding_past_k_is_code_zero():
    codes = random_codes(8, 40, seed=2)   # one full 32-block and one with 8 of 32 columns
    words = quant.pack_int4(codes)[0, 1]
    padded = torch.zeros(8, 64, dtype=torch.uint8)
    padded[:, :40] = codes
    assert torch.equal(quant.unpack_int4(quant.pack_int4(padded), 64)[:, 40:], torch.zeros(8, 24, dtype=torch.uint8))
    assert torch.equal(words, quant.pack_int4(padded)[0, 1])


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_int4_is_within_half_a_step(group_size, symmetric, dtype):
    n, k = 48, 256
    w = randn((n, k), dtype=dtype, seed=group_size + 100 * symmetric, scale=0.05)
    w[3, :64] = 0.0                         # an all-zero group (any group size)
    q = quant.quantize_int4(w, group_size=group_size, symmetric=symmetric)
    size = k if group_size == -1 else group_size
    assert q.scales.shape == (k // size, n) and q.zeros.shape == (k // size, n)
    assert q.scales.dtype == (dtype if dtype != torch.float32 else torch.bfloat16)
    codes = q.codes()
    assert int(codes.max()) <= 15
    if symmetric:
        assert (q.zeros == 8).all()
    else:
        assert int(q.zeros.max()) <= 15
    w_hat = quant.dequantize(q)
    step = q.scales.float().T.repeat_interleave(size, dim=1)     # (N, K): each element's group scale
    assert ((w.float() - w_hat).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.equal(w_hat, reference.dequantize_int4(codes, q.scales, q.zeros, group_size))
    assert (w_hat[3, :64] == 0).all()       # zero is exact


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_int4_kernel_gives_the_reference_bits(device, dtype, symmetric):
    """The quantization kernel (CPU, emulated CUDA, CUDA: a model converted on the GPU) against the
    formula in torch ops (llmkernels.reference.quant.quantize_int4), bit for bit: codes, scales, zero
    points. Groups that are all zero, all positive, all negative, and one near-half value per group."""
    w = randn((24, 2752), seed=9, scale=0.05).to(dtype)
    w[0, :64] = 0
    w[1, :64] = w[1, :64].abs()
    w[2, :64] = -w[2, :64].abs()
    for group_size in (32, 64, -1):
        for scale_dtype in (torch.bfloat16, torch.float16):
            q = quant.quantize_int4(w.to(device), group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
            codes, scales, zeros = reference.quantize_int4(w, group_size, symmetric, scale_dtype)
            assert torch.equal(q.codes().cpu(), codes), (group_size, scale_dtype)
            assert torch.equal(q.scales.cpu(), scales) and torch.equal(q.zeros.cpu(), zeros), (group_size, scale_dtype)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_quantize_int4_nan_groups(device, symmetric):
    """A group holding a NaN: scale 1, zero point 0 (8 symmetric), the NaN's code 0, the group's other
    codes from scale 1; the same on every backend as the torch formula; other groups untouched."""
    w = randn((8, 64), seed=12, scale=0.05)
    w[0, 0] = float("nan")
    w[3, 40] = float("nan")
    q = quant.quantize_int4(w.to(device), group_size=32, symmetric=symmetric, scale_dtype=torch.bfloat16)
    codes, scales, zeros = reference.quantize_int4(w, 32, symmetric, torch.bfloat16)
    assert torch.equal(q.codes().cpu(), codes) and torch.equal(q.scales.cpu(), scales)
    assert torch.equal(q.zeros.cpu(), zeros)
    assert q.scales[0, 0] == 1 and q.scales[1, 3] == 1 and q.scales[0, 1] != 1


def test_quantize_int8_kernel_gives_the_reference_bits(device):
    w = randn((40, 200), seed=10, scale=0.1)
    w[3] = 0
    smooth = torch.rand(200, generator=generator(11)) + 0.5
    for factors in (None, smooth):
        q = quant.quantize_int8(w.to(device), smooth=None if factors is None else factors.to(device))
        codes, scales = reference.symmetric_int8(w * (1 if factors is None else factors))
        assert torch.equal(q.data.cpu(), codes) and torch.equal(q.scales.cpu(), scales[:, 0])


def test_quantize_int4_refuses_bad_shapes_and_types():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quant.quantize_int4(torch.randn(8, 96), group_size=64)
    with pytest.raises(ValueError, match="multiples of 8"):
        quant.quantize_int4(torch.randn(12, 64), group_size=32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quant.quantize_int4(torch.randn(8, 64), group_size=16)
    with pytest.raises(TypeError):
        quant.quantize_int4(torch.randint(0, 3, (8, 64)))
    with pytest.raises(ValueError, match=r"codes must hold 4-bit codes in \[0, 15\]; got 16"):
        quant.pack_int4(torch.full((8, 8), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples of 8"):
        quant.pack_int4(torch.zeros(8, 12, dtype=torch.uint8))


def test_reference_int4_linear_is_the_dequantized_matmul():
    w = randn((24, 128), seed=3, scale=0.1)
    q = quant.quantize_int4(w, group_size=32)
    x = randn((5, 128), seed=4)
    bias = randn((24,), seed=5)
    out = reference.int4_linear(x, q.codes(), q.scales, q.zeros, 32, bias)
    torch.testing.assert_close(out, x @ quant.dequantize(q).T + bias, rtol=1e-6, atol=1e-6)


def test_opcheck_pack_and_unpack():
    codes = random_codes(16, 40, seed=9)
    torch.library.opcheck(torch.ops.llmkernels.quant_pack_int4.default, (codes,))
    torch.library.opcheck(torch.ops.llmkernels.quant_unpack_int4.default, (quant.pack_int4(codes), 40))


# -- W4A16: the CPU kernel, the CUDA kernel emulated, the CUDA kernel -----------------------------------

def cpu_kernel(device) -> bool:
    return device.type == "cpu" and not llmkernels.emulator.enabled()


def int4_case(m, n, k, group_size, symmetric, dtype, device, seed, bias=True):
    """x (m, k), an int4 weight (n, k) quantized with scales in x's dtype, bias or None, on `device`;
    and the weight's codes (unpacked on the CPU)."""
    q = quant.quantize_int4(randn((n, k), seed=seed, scale=k ** -0.5), group_size=group_size, symmetric=symmetric,
                            scale_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
    x = randn((m, k), dtype=dtype, seed=seed + 1)
    b = randn((n,), seed=seed + 2) if bias else None
    return x.to(device), q.to(device), (b.to(device) if bias else None), q.codes().to(device)


def check_int4(out, x, q, bias, codes, device, name):
    """The parity rule against the float64 product with the dequantized weight. Torch's own error:
    for the CPU kernel (float32 arithmetic) the float32 matmul rounded once; for the CUDA kernel (its
    tensor cores take the weight dequantized into x's dtype) a matmul in x's dtype with the weight
    dequantized and rounded to it, which is what a user without the kernel runs."""
    k = x.shape[-1]
    w = reference.dequantize_int4(codes, q.scales, q.zeros, q.group_size)
    oracle = x.double().reshape(-1, k) @ w.double().T
    if bias is not None:
        oracle = oracle + bias.double()
    same = reference.int4_linear(x.reshape(-1, k), codes, q.scales, q.zeros, q.group_size, bias,
                                 upcast=cpu_kernel(device))
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], q.shape[0])
    assert_parity(out.reshape(-1, q.shape[0]), same, oracle, name)


@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 17, 64, 129])
def test_int4_linear_matches_the_dequantized_reference(device, m, group_size):
    """W4A16 under the parity rule, symmetric and not, bf16, N not a multiple of the tiles, K with half
    a k tile of 64 at the end where the group size allows it (groups 32 and per-channel)."""
    k = 288 if group_size in (32, -1) else 384
    x, q, bias, codes = int4_case(m, 40, k, group_size, m % 2 == 0, torch.bfloat16, device, seed=m)
    check_int4(quant.int4_linear(x, q, bias), x, q, bias, codes, device, f"int4_linear m={m} group {group_size}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_linear_fp16_and_3d_input(device, dtype):
    x, q, bias, codes = int4_case(6, 24, 96, 32, False, dtype, device, seed=3)
    x = x.reshape(2, 3, 96)
    check_int4(quant.int4_linear(x, q, bias), x, q, bias, codes, device, f"{dtype} 3-D")


@pytest.mark.parametrize("k", [2752, 5504, 7392, 10944])
def test_int4_linear_tensor_parallel_k(device, k):
    """The K of Llama tensor-parallel splits that Marlin refuses (K % 128 != 0 for some): group 32 and
    per-channel, fp16 activations, small M (split K on the CUDA kernel)."""
    for group_size in (32, -1):
        x, q, _, codes = int4_case(3, 16, k, group_size, False, torch.float16, device, seed=k, bias=False)
        check_int4(quant.int4_linear(x, q), x, q, None, codes, device, f"k={k} group {group_size}")


# Llama-2/3 7B/8B and 70B projections (N, K), and the tensor-parallel K of their splits. On the CPU
# (and emulated: too slow there, so not run) N is cut to 256 rows of the weight: the product's
# reduction over K is what the shape tests, and the tiles over N repeat; on CUDA the full shapes.
LLAMA_SHAPES = [(4096, 4096), (6144, 4096), (11008, 4096), (4096, 11008), (28672, 4096), (4096, 14336),
                (8192, 8192), (10240, 8192), (8192, 28672), (57344, 8192), (4096, 2752), (4096, 5504)]


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("shape", LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int4_linear_llama_projection_shapes(device, shape):
    """(On CUDA everything is made on the GPU, quantization included: a 57344 x 8192 weight quantized
    and unpacked on the CPU would take most of the GPU run's test budget.)"""
    device = torch.device(device)
    n, k = shape if device.type == "cuda" else (256, shape[1])
    group_size = 128 if k % 128 == 0 else 64   # K = 2752: 43 groups of 64
    g = torch.Generator(device=device).manual_seed(k)
    w = torch.randn(n, k, generator=g, device=device) * k ** -0.5
    q = quant.quantize_int4(w, group_size=group_size, scale_dtype=torch.bfloat16)
    codes = q.codes()
    del w
    for m in (1, 16) if device.type == "cuda" else (1, 7):
        x = torch.randn(m, k, generator=g, device=device).to(torch.bfloat16)
        bias = torch.randn(n, generator=g, device=device)
        check_int4(quant.int4_linear(x, q, bias), x, q, bias, codes, device, f"{n}x{k} m={m}")


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_quantized_linears_at_m_1000(device):
    device = torch.device(device)
    n, k = (4096, 4096) if device.type == "cuda" else (64, 1024)
    x, q, bias, codes = int4_case(1000, n, k, 64, True, torch.bfloat16, device, seed=1000)
    check_int4(quant.int4_linear(x, q, bias), x, q, bias, codes, device, "W4A16 m=1000")
    q8 = quant.quantize_int8(randn((n, k), seed=1001, scale=k ** -0.5)).to(device)
    check_w8a16(quant.int8_linear(x, q8, bias, activations="fp"), x, q8, bias, device, "W8A16 m=1000")
    codes8, scales = torch_per_token(x.float())
    out = quant.int8_linear(x, q8, bias)
    oracle = reference.w8a8_linear(codes8.cpu(), scales.cpu(), q8.data.cpu(), q8.scales.cpu(), bias.cpu(), torch.float64)
    same = reference.w8a8_linear(codes8.cpu(), scales.cpu(), q8.data.cpu(), q8.scales.cpu(), bias.cpu(), x.dtype)
    assert_parity(out.cpu(), same, oracle, "W8A8 m=1000")


def test_int4_linear_misaligned_and_strided_x(device):
    """A view that starts off a 16-byte boundary or has an odd row stride is copied, not refused."""
    x, q, bias, codes = int4_case(5, 16, 64, 32, True, torch.bfloat16, device, seed=4)
    padded = torch.zeros(5, 67, dtype=x.dtype, device=x.device)
    padded[:, 1:65] = x
    view = padded[:, 1:65]
    check_int4(quant.int4_linear(view, q, bias), x, q, bias, codes, device, "strided view")
    flat = torch.zeros(5 * 64 + 1, dtype=x.dtype, device=x.device)
    flat[1:].copy_(x.reshape(-1))
    check_int4(quant.int4_linear(flat[1:].view(5, 64), q, bias), x, q, bias, codes, device, "misaligned start")


def test_int4_linear_float32_and_bad_inputs():
    q = quant.quantize_int4(randn((24, 64), seed=1), group_size=32)
    x = randn((5, 64), seed=2)
    out = quant.int4_linear(x, q)
    oracle = x.double() @ quant.dequantize(q).double().T
    assert_parity(out, x @ quant.dequantize(q).T, oracle, "fp32")
    with pytest.raises(ValueError, match="in_features 64"):
        quant.int4_linear(randn((5, 32)), q)
    with pytest.raises(TypeError, match="Int4Weight"):
        quant.int4_linear(x, q.packed)
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\)"):
        quant.int4_linear(x, q, torch.zeros(23))


@pytest.mark.parametrize("device", [pytest.param("emu", marks=pytest.mark.emu), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_int4_linear_device_kernel_refuses_what_it_cannot_take(device):
    """The tensor-core kernel dequantizes into x's dtype: float32 x and scales of another dtype are
    refused there (not silently converted), with what to do instead."""
    where = "cpu" if device == "emu" else "cuda"
    context = llmkernels.emulator.emulate() if device == "emu" else contextlib.nullcontext()
    q = quant.quantize_int4(randn((16, 64), seed=1), group_size=32, scale_dtype=torch.float16).to(where)
    with context:
        with pytest.raises(TypeError, match=r"x must be bfloat16 or float16 for the CUDA kernel \(float32 runs on the CPU"):
            quant.int4_linear(randn((2, 64), seed=2).to(where), q)
        with pytest.raises(TypeError, match=r"scales must have x's dtype \(bfloat16\).*got float16: quantize with scale_dtype"):
            quant.int4_linear(randn((2, 64), dtype=torch.bfloat16, seed=2).to(where), q)


def test_opcheck_int4_linear():
    q = quant.quantize_int4(randn((16, 64), seed=6), group_size=32)
    x = randn((3, 64), dtype=torch.bfloat16, seed=7)
    torch.library.opcheck(torch.ops.llmkernels.quant_int4_linear.default,
                          (x, q.packed, q.scales, q.zeros, 32, randn((16,), seed=8)))


# -- int8 formats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothquant"])
def test_quantize_int8_is_within_half_a_step(smooth):
    w = randn((24, 72), seed=11, scale=0.1)
    w[5] = 0.0
    factors = torch.rand(72, generator=generator(12)) + 0.5 if smooth else None
    q = quant.quantize_int8(w, smooth=factors)
    assert q.data.dtype == torch.int8 and q.scales.shape == (24,) and int(q.data.abs().max()) <= 127
    scaled = w * factors if smooth else w
    step = q.scales[:, None]
    assert ((scaled.double() - q.data.double() * step.double()).abs() <= step.double() / 2 * (1 + 1e-9)).all()
    assert (quant.dequantize(q)[5] == 0).all()
    torch.testing.assert_close(quant.dequantize(q), w, rtol=0, atol=float(q.scales.max()) / 2 / 0.5 + 1e-6)


def torch_per_token(v: torch.Tensor):
    """The per-token formula in torch ops (llmkernels.reference.quant.symmetric_int8: float32 scale =
    max|v| / 127, 1 for an all-zero row; codes round-half-even(v / scale) in float64, clamped): what
    the kernels must reproduce bit for bit."""
    return reference.symmetric_int8(v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_is_within_half_a_step(device, dtype):
    x = randn((2, 5, 40), dtype=dtype, seed=13).to(device)
    x[1, 2] = 0
    codes, scales = quant.quantize_per_token(x)
    assert codes.shape == x.shape and codes.dtype == torch.int8 and scales.shape == (2, 5, 1)
    assert ((x.double() - codes.double() * scales.double()).abs() <= scales.double() / 2 * (1 + 1e-9)).all()
    assert (codes[1, 2] == 0).all() and (scales[1, 2] == 1).all()
    expected_codes, expected_scales = torch_per_token(x.float())
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales)


def test_quantize_per_token_smooth_long_rows_and_nan(device):
    """SmoothQuant division inside the kernel (the same bits as dividing first in float32); rows longer
    than the CUDA kernel's block and not a multiple of it; a NaN makes its row's scale NaN."""
    x = randn((3, 1000), dtype=torch.bfloat16, seed=14)
    smooth = torch.rand(1000, generator=generator(15)) + 0.5
    codes, scales = quant.quantize_per_token(x.to(device), smooth.to(device))
    expected_codes, expected_scales = torch_per_token(x.float() / smooth)
    assert torch.equal(codes.cpu(), expected_codes) and torch.equal(scales.cpu(), expected_scales)
    x[1, 7] = float("nan")
    codes, scales = quant.quantize_per_token(x.to(device))
    assert torch.isnan(scales[1]).all() and torch.isfinite(scales[[0, 2]]).all()
    assert torch.equal(codes[[0, 2]].cpu(), torch_per_token(x[[0, 2]].float())[0])


def test_reference_int8_matmul_is_exact():
    """The integer accumulators W8A8 must reproduce bit for bit: the reference's int64 product against
    a float64 product of the same codes (exact: |entries| < 2^53)."""
    a = torch.randint(-127, 128, (17, 4096), generator=generator(14), dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 4096), generator=generator(15), dtype=torch.int8)
    exact = reference.int8_matmul(a, b)
    assert exact.dtype == torch.int64
    assert torch.equal(exact, (a.double() @ b.double().T).long())
    assert int(exact.abs().max()) < 2 ** 31
    with pytest.raises(TypeError):
        reference.int8_matmul(a.float(), b)


# -- W8A8: the CPU kernel, the CUDA kernel emulated, the CUDA kernel ---------------------------------

# K = 40 and 2744: rows that start 8 bytes past a 16-byte boundary (the CUDA kernel's 8-byte copies).
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 24, 40), (17, 40, 4096), (64, 16, 2752), (20, 24, 2744),
                                   (130, 136, 200)], ids=lambda s: "x".join(map(str, s)))
def test_int8_matmul_accumulators_match_the_reference_bit_for_bit(device, shape):
    m, n, k = shape
    a = torch.randint(-127, 128, (m, k), generator=generator(k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=generator(k + 1), dtype=torch.int8)
    acc = quant.int8_matmul(a.to(device), b.to(device))
    assert acc.dtype == torch.int32
    assert torch.equal(acc.cpu().long(), reference.int8_matmul(a, b))


@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothquant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_linear_matches_the_reference(device, dtype, smooth):
    """W8A8 against the reference on the same codes and scales under the parity rule (oracle: the
    exact integer product scaled in float64; torch's own error: the same scaled in the output dtype).
    The codes are torch's formula (torch_per_token), independent of the kernels."""
    w = randn((40, 136), seed=21, scale=0.1)
    factors = torch.rand(136, generator=generator(22)) + 0.5 if smooth else None
    q = quant.quantize_int8(w, smooth=factors)
    x = randn((2, 7, 136), dtype=dtype, seed=23)
    bias = randn((40,), seed=24)
    out = quant.int8_linear(x.to(device), q.to(device), bias.to(device))
    rows = x.reshape(-1, 136).float() / (factors if smooth else 1.0)
    codes, scales = torch_per_token(rows)
    oracle = reference.w8a8_linear(codes, scales, q.data, q.scales, bias, torch.float64).reshape(2, 7, 40)
    same = reference.w8a8_linear(codes, scales, q.data, q.scales, bias, dtype).reshape(2, 7, 40)
    assert out.dtype == dtype
    assert_parity(out.cpu(), same, oracle, f"int8_linear {dtype} smooth={smooth}")


# -- W8A16: the CPU kernel, the CUDA kernel emulated, the CUDA kernel --------------------------------

def check_w8a16(out, x, q, bias, device, name):
    """The parity rule against the float64 product with the dequantized weight; torch's own error:
    the float32 product rounded once (CPU kernel) or a matmul in x's dtype with the dequantized weight
    rounded to it (the CUDA kernel's tensor cores take x's dtype)."""
    k, n = x.shape[-1], q.data.shape[0]
    w = quant.dequantize(q.to("cpu")).to(x.device)
    rows = x.reshape(-1, k)
    oracle = rows.double() @ w.double().T + (bias.double() if bias is not None else 0)
    if cpu_kernel(device):
        same = (rows.float() @ w.T + (bias if bias is not None else 0)).to(x.dtype)
    else:
        same = rows @ w.to(x.dtype).T + (bias.to(x.dtype) if bias is not None else 0)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], n)
    assert_parity(out.reshape(-1, n), same, oracle, name)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 129])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w8a16_matches_the_dequantized_reference(device, m, dtype):
    k = 1032 if m <= 16 else 200    # small M: split K (and K = 8 mod 16: 8-byte copies of the weight)
    q = quant.quantize_int8(randn((40, k), seed=m, scale=k ** -0.5)).to(device)
    x = randn((m, k), dtype=dtype, seed=m + 1).to(device)
    bias = randn((40,), seed=m + 2).to(device)
    check_w8a16(quant.int8_linear(x, q, bias, activations="fp"), x, q, bias, device, f"W8A16 m={m} {dtype}")


def test_w8a16_float32_and_3d(device):
    q = quant.quantize_int8(randn((16, 64), seed=5)).to(device)
    x = randn((2, 3, 64), dtype=torch.bfloat16, seed=6).to(device)
    check_w8a16(quant.int8_linear(x, q, activations="fp"), x, q, None, device, "3-D")
    if cpu_kernel(device):
        x32 = randn((4, 64), seed=7)
        check_w8a16(quant.int8_linear(x32, q, activations="fp"), x32, q, None, device, "fp32")
    else:
        with pytest.raises(TypeError, match=r"x must be bfloat16 or float16 for the CUDA kernel"):
            quant.int8_linear(randn((4, 64), seed=7).to(device), q, activations="fp")


W8A16_TILINGS = {"small": (16, 72, 12 * 64 + 8), "medium": (130, 136, 6 * 64 + 16),
                 "large": (12 * 128, 11 * 128 + 8, 4 * 64 + 32)}


@pytest.mark.emu
@pytest.mark.parametrize("tiling", sorted(W8A16_TILINGS))
def test_emulated_w8a16_kernel_every_tiling_without_bank_conflicts(tiling):
    m, n, k = W8A16_TILINGS[tiling]
    q = quant.quantize_int8(randn((n, k), seed=n, scale=k ** -0.5))
    x = randn((m, k), dtype=torch.bfloat16, seed=m)
    bias = randn((n,), seed=3)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate():
        out = quant.int8_linear(x, q, bias, activations="fp")
        check_w8a16(out, x, q, bias, torch.device("cpu"), f"emulated W8A16, {tiling}")
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    assert set(reports) == ({"int8_linear_w8a16", "int8_linear_w8a16 split-k reduce"} if tiling == "small"
                            else {"int8_linear_w8a16"}), sorted(reports)
    report = reports["int8_linear_w8a16"]
    assert report["bank_conflicts_by_site"] == {}, report
    assert report["shared_wavefronts"] == report["shared_ideal_wavefronts"]


def test_int8_linear_refuses_what_it_does_not_do():
    q = quant.quantize_int8(randn((8, 16), seed=1))
    with pytest.raises(ValueError, match=r"activations must be one of \('int8', 'fp'\); got 'fp8'"):
        quant.int8_linear(randn((2, 16)), q, activations="fp8")
    smoothed = quant.quantize_int8(randn((8, 16), seed=1), smooth=torch.ones(16))
    with pytest.raises(ValueError, match="without SmoothQuant factors"):
        quant.int8_linear(randn((2, 16)), smoothed, activations="fp")
    with pytest.raises(ValueError, match="in_features 16"):
        quant.int8_linear(randn((2, 8)), q)
    with pytest.raises(TypeError, match="int8"):
        quant.int8_matmul(torch.zeros(2, 8), torch.zeros(3, 8))
    codes = lambda *shape: torch.zeros(*shape, dtype=torch.int8)
    with pytest.raises(ValueError, match="in_features and out_features must be multiples of 8"):
        quant.int8_matmul(codes(4, 12), codes(8, 12))
    with pytest.raises(ValueError, match="in_features and out_features must be multiples of 8"):
        quant.int8_matmul(codes(4, 16), codes(7, 16))
    with pytest.raises(TypeError, match="out must be float32, bfloat16 or float16; got float64"):
        torch.ops.llmkernels.quant_int8_linear(codes(2, 16), torch.ones(2), codes(8, 16), torch.ones(8), None,
                                               torch.float64)


def test_opcheck_int8_ops():
    a = torch.randint(-127, 128, (3, 32), generator=generator(31), dtype=torch.int8)
    b = torch.randint(-127, 128, (8, 32), generator=generator(32), dtype=torch.int8)
    torch.library.opcheck(torch.ops.llmkernels.quant_int8_matmul.default, (a, b))
    torch.library.opcheck(torch.ops.llmkernels.quant_int8_linear.default,
                          (a, torch.rand(3), b, torch.rand(8), None, torch.bfloat16))
    x = randn((3, 32), dtype=torch.bfloat16, seed=33)
    torch.library.opcheck(torch.ops.llmkernels.quant_quantize_per_token.default, (x, torch.rand(32) + 0.5))
    torch.library.opcheck(torch.ops.llmkernels.quant_int8_weight_linear.default, (x, b, torch.rand(8), torch.rand(8)))


@pytest.mark.slow
def test_torch_compile_of_every_quantized_linear_follows_changing_m():
    """fullgraph torch.compile of W4A16, W8A8 and W8A16, with a second M (a symbolic M: the split-K
    workspace's size must stay traceable)."""
    q4 = quant.quantize_int4(randn((24, 256), seed=40, scale=0.1), group_size=64)
    q8 = quant.quantize_int8(randn((24, 256), seed=41, scale=0.1))
    bias = randn((24,), seed=42)
    for fn in (lambda x: quant.int4_linear(x, q4, bias), lambda x: quant.int8_linear(x, q8, bias),
               lambda x: quant.int8_linear(x, q8, bias, activations="fp")):
        compiled = torch.compile(fn, fullgraph=True)
        for m in (3, 5, 40):
            x = randn((m, 256), dtype=torch.bfloat16, seed=m)
            assert torch.equal(compiled(x), fn(x)), m


# -- linear layers and model conversion ---------------------------------------------------------------

class TinyTransformer(torch.nn.Module):
    """Embedding, two pre-norm blocks (qkv and output projections around causal attention, a GELU
    MLP), a final norm and an lm_head: every projection an nn.Linear."""

    def __init__(self, vocab=64, width=64, heads=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList()
        for _ in range(2):
            block = torch.nn.Module()
            block.norm1, block.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
            block.qkv, block.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
            block.up, block.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
            self.blocks.append(block)
        self.norm = torch.nn.LayerNorm(width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        b, s, w = x.shape
        for block in self.blocks:
            q, k, v = block.qkv(block.norm1(x)).view(b, s, 3, self.heads, w // self.heads).unbind(2)
            x = x + block.out(llmkernels.attention(q, k, v, causal=True).reshape(b, s, w))
            x = x + block.down(torch.nn.functional.gelu(block.up(block.norm2(x))))
        return self.lm_head(self.norm(x))


@pytest.mark.parametrize("bits, activations", [(4, "int8"), (8, "int8"), (8, "fp")], ids=["w4a16", "w8a8", "w8a16"])
def test_quantize_model_keeps_logits_close(bits, activations):
    model = TinyTransformer(seed=bits)
    tokens = torch.randint(0, 64, (2, 19), generator=generator(bits))
    with torch.no_grad():
        expected = model(tokens)
        quant.quantize_model_(model, bits=bits, group_size=32, activations=activations)
        got = model(tokens)
    swapped = [m for m in model.modules() if isinstance(m, (quant.Int4Linear, quant.Int8Linear))]
    assert len(swapped) == 8 and type(model.lm_head) is torch.nn.Linear     # lm_head skipped by default
    assert all(getattr(m, "activations", activations) == activations for m in swapped)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    relative = ((got - expected).norm() / expected.norm()).item()
    # measured: int4 (group 32) cosine 0.99944, relative error 0.033; int8 (W8A8) 0.999992 and 0.0039;
    # W8A16 (weights alone quantized) 0.999998 and 0.0018
    minimum_cosine, maximum_relative = (0.998, 0.06) if bits == 4 else (0.9999, 0.01)
    assert cosine > minimum_cosine and relative < maximum_relative, (cosine, relative)


def test_int8_linear_module_survives_a_cast_of_the_model():
    """model.to(torch.bfloat16) casts floating buffers: the scales must still reach the kernel in float32."""
    module = quant.Int8Linear.from_linear(torch.nn.Linear(32, 16)).to(torch.bfloat16)
    x = randn((3, 32), dtype=torch.bfloat16, seed=14)
    out = module(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_int4_linear_module_state_dict_round_trip():
    linear = torch.nn.Linear(64, 24)
    module = quant.Int4Linear.from_linear(linear, group_size=32, symmetric=True)
    x = randn((3, 64), seed=41)
    again = quant.Int4Linear(64, 24, bias=True, group_size=32, symmetric=True)
    again.load_state_dict(module.state_dict())
    assert torch.equal(again(x), module(x))
    assert torch.equal(module(x), quant.int4_linear(x, module.quantized_weight(), module.bias))
    int8 = quant.Int8Linear.from_linear(linear)
    int8_again = quant.Int8Linear(64, 24)
    int8_again.load_state_dict(int8.state_dict())
    assert torch.equal(int8_again(x), int8(x))


def test_quantize_model_refuses_layers_it_cannot_take():
    model = torch.nn.Sequential(torch.nn.Linear(64, 12), torch.nn.Linear(12, 8))
    with pytest.raises(ValueError, match=r"layer '0' \(64 -> 12\)"):
        quant.quantize_model_(model, bits=4, group_size=32)
    quant.quantize_model_(model, bits=8, skip=("0", "1"))   # everything skipped: unchanged
    assert all(type(m) is torch.nn.Linear for m in model)


# -- the CUDA W4A16 kernel's source under the emulator: every tiling, no bank conflicts, any schedule --

# One shape per tiling of quant_cuda.cu: small (M <= 16, K split into ranges), medium, large (>= 132
# tiles of 128 x 128); each with more k tiles of 64 than its ring has stages and half a tile at the end,
# so the prefetch wraps onto used buffers and the last tile overhangs K.
INT4_TILINGS = {"small": (16, 72, 12 * 64 + 32, 32), "medium": (130, 136, 6 * 64 + 32, -1),
                "large": (12 * 128, 11 * 128 + 8, 4 * 64 + 32, 32)}


@pytest.mark.emu
@pytest.mark.parametrize("tiling", sorted(INT4_TILINGS))
def test_emulated_int4_kernel_every_tiling_without_bank_conflicts(tiling):
    m, n, k, group_size = INT4_TILINGS[tiling]
    x, q, bias, codes = int4_case(m, n, k, group_size, False, torch.bfloat16, torch.device("cpu"), seed=21)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate():
        out = quant.int4_linear(x, q, bias)
        check_int4(out, x, q, bias, codes, torch.device("cpu"), f"emulated int4_linear, {tiling} tiling")
    reports = {r["kernel"]: r for r in llmkernels.emulator.report()}
    expected = {"int4_linear", "int4_linear split-k reduce"} if tiling == "small" else {"int4_linear"}
    assert set(reports) == expected, sorted(reports)
    if tiling == "small":
        assert reports["int4_linear"]["blocks"] > 2   # K split into ranges (N gives 2 column blocks)
    report = reports["int4_linear"]
    assert report["launches"] == 1 and report["shared_accesses"] > 0
    assert report["bank_conflicts_by_site"] == {}, report
    assert report["shared_wavefronts"] == report["shared_ideal_wavefronts"]


@pytest.mark.emu
@pytest.mark.parametrize("seed", [1, 2])
def test_emulated_int4_kernel_gives_the_same_bits_under_shuffled_schedules(seed):
    for m in (5, 33):
        x, q, bias, _ = int4_case(m, 24, 1024, 64, seed == 1, torch.float16, torch.device("cpu"), seed=seed)
        with llmkernels.emulator.emulate():
            ordered = quant.int4_linear(x, q, bias)
        with llmkernels.emulator.emulate(schedule="shuffled", seed=seed):
            shuffled = quant.int4_linear(x, q, bias)
        assert torch.equal(ordered, shuffled), m


# -- the CUDA W8A8 kernel's source under the emulator: every tiling, no bank conflicts ---------------

# small (M <= 16), medium, large (>= 132 tiles of 128 x 128); K tails of the 64-byte k tile, and K =
# 8 mod 16 (8-byte copies) on the medium tiling.
INT8_TILINGS = {"small": (16, 72, 7 * 128 + 16), "medium": (130, 136, 5 * 64 + 8),
                "large": (12 * 128, 11 * 128 + 8, 4 * 64 + 16)}


@pytest.mark.emu
@pytest.mark.parametrize("tiling", sorted(INT8_TILINGS))
def test_emulated_int8_kernel_every_tiling_without_bank_conflicts(tiling):
    m, n, k = INT8_TILINGS[tiling]
    a = torch.randint(-127, 128, (m, k), generator=generator(m), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=generator(n), dtype=torch.int8)
    llmkernels.emulator.reset_report()
    with llmkernels.emulator.emulate():
        acc = quant.int8_matmul(a, b)
    assert torch.equal(acc.long(), reference.int8_matmul(a, b))
    (report,) = [r for r in llmkernels.emulator.report() if r["kernel"] == "int8_linear"]
    assert report["launches"] == 1 and report["shared_accesses"] > 0
    assert report["bank_conflicts_by_site"] == {}, report
    assert report["shared_wavefronts"] == report["shared_ideal_wavefronts"]
