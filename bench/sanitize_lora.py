"""The LoRA kernels once on CUDA for compute-sanitizer (bench/gpu_check.sh runs it under each tool):
lora_linear's forward (the shrink, then the fused kernel: the base's k tiles and the adapter's, the bias
in its epilogue) and its backward (the same two kernels transposed, the weights read k-major, for dx; dA
and dB are torch matmuls), on edge shapes: ranks 1 (padded to 8 by the Python layer), 16 and 64; M = 1 with K long enough for split-K in the forward, and N long enough for it in
the backward's dx; M = 5 (the small tiling), odd M = 37 and 130 (the medium tiling) and 1100 x 2056 (the
large tiling: forward in one, backward in the other); N and K multiples of 8 but of nothing larger; with
and without a bias; bf16 and one fp16 shape; LoRA's input dropout on three of them (the dropout kernel on
x in the forward, on x and on u A in the backward; a partial last block) and on a strided x (lda > K),
which also runs without it. Then the two layouts beyond one adapter: multi-adapter serving (forward only,
under no_grad: L = 3 adapters with ranks 16, 8 and 0 of r = 16, a (3,) scale tensor, unsorted ids with
-1 among them, a bias; the small kernel that lists each row tile's adapters, the shrink once per adapter
of a block, the fused kernel's k tiles per adapter; M = 37, and 200 in an order sorted by adapter), an
int4 base weight (M = 5 and 200, forward and backward) and fused-projection slices (one adapter, slices
[64, 32, 40] of N = 136, a (3,) scale tensor, dropout; forward and backward, which takes the unfused
route: dy W by the transposed kernels, u A added through the dropout kernel). The GEMM kernels use shared
memory, cp.async and barriers.
# sanitize: racecheck synccheck

Dry runs without a GPU, on CPU tensors (the CPU kernel), or with the CUDA kernels emulated:

    python bench/sanitize_lora.py --device cpu
    python bench/sanitize_lora.py --device cpu --emulate
"""
import argparse
import contextlib

import torch

from _sanitize_util import finish

import llmkernels
from llmkernels import lora, quant

# (M, N, K, rank, bias, dtype, dropout_p)
SHAPES = (
    (1, 40, 1032, 16, True, torch.bfloat16, 0.1),      # forward: split-K (k = 1088 + 64)
    (1, 1032, 40, 64, False, torch.bfloat16, 0.0),     # backward: dx (1, 40) split-K over N
    (5, 264, 520, 1, True, torch.bfloat16, 0.0),       # rank 1, the small tiling
    (37, 24, 200, 16, False, torch.float16, 0.5),
    (130, 136, 264, 64, True, torch.bfloat16, 0.0),
    (1100, 2056, 40, 16, True, torch.bfloat16, 0.0),   # forward on the large tiling
    (1100, 40, 2056, 1, False, torch.bfloat16, 0.1),   # backward's dx (1100, 2056) on the large tiling
)


def main(device: torch.device) -> None:
    generator = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *shape, dtype: torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)
    results = []

    def forward_and_backward(x, weight, lora_a, lora_b, bias, dropout_p, scale=None, slices=None):
        """The forward without autograd, then a training step (x, A, B and the bias requiring grad). scale:
        2 / r unless given; slices: lora_a is then (S, r, K)."""
        scale = 2.0 / lora_a.shape[-2] if scale is None else scale
        options = dict(dropout_p=dropout_p, seed=12345 if dropout_p else None, slices=slices)
        with torch.no_grad():
            results.append(lora.lora_linear(x, weight, lora_a, lora_b, scale, bias=bias, **options))
        # (detach, not clone: a strided x stays strided)
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, lora_a, lora_b, bias)]
        out = lora.lora_linear(leaves[0], weight, leaves[1], leaves[2], scale, bias=leaves[3], **options)
        wanted = [t for t in leaves if t is not None]
        results.extend([out.detach(), *torch.autograd.grad(out, wanted, randn(*out.shape, dtype=out.dtype))])

    for m, n, k, rank, with_bias, dtype, dropout_p in SHAPES:
        forward_and_backward(randn(m, k, dtype=dtype), randn(n, k, dtype=dtype) * k ** -0.5,
                             randn(rank, k, dtype=dtype) * k ** -0.5, randn(n, rank, dtype=dtype) * rank ** -0.5,
                             randn(n, dtype=dtype) if with_bias else None, dropout_p)
    m, n, k, rank, bf16 = 37, 24, 200, 16, torch.bfloat16
    wide = randn(m, k + 8, dtype=bf16)   # x a strided view: rows 208 elements apart
    for dropout_p in (0.0, 0.3):
        forward_and_backward(wide[:, :k], randn(n, k, dtype=bf16), randn(rank, k, dtype=bf16),
                             randn(n, rank, dtype=bf16), None, dropout_p)

    n, k, rank, adapters = 136, 264, 16, 3
    for m in (37, 200):   # (200: past lora.SORTED_ROWS, the rows in an order sorted by adapter)
        ids = torch.randint(-1, adapters, (m,), generator=generator)
        ids[[3, 20]] = torch.tensor([-1, 2])   # -1 and the highest id certainly among the rows (unsorted)
        with torch.no_grad():
            results.append(lora.lora_linear(
                randn(m, k, dtype=bf16), randn(n, k, dtype=bf16) * k ** -0.5,
                randn(adapters, rank, k, dtype=bf16) * k ** -0.5, randn(adapters, n, rank, dtype=bf16) * rank ** -0.5,
                torch.tensor([2.0, 0.5, 1.0], device=device), bias=randn(n, dtype=bf16),
                adapter_ids=ids.to(device=device, dtype=torch.int32), ranks=[16, 8, 0]))
    m = 37
    for rows in (5, 200):   # an int4 base weight (the fused kernel dequantizing in its main loop): small, medium tiling
        w4 = quant.quantize_int4(randn(n, 256, dtype=bf16) * 256 ** -0.5, group_size=64)
        forward_and_backward(randn(rows, 256, dtype=bf16), w4, randn(rank, 256, dtype=bf16) * 256 ** -0.5,
                             randn(n, rank, dtype=bf16) * rank ** -0.5, randn(n, dtype=bf16), 0.0)
    slices = [64, 32, 40]
    forward_and_backward(randn(m, k, dtype=bf16), randn(n, k, dtype=bf16) * k ** -0.5,
                         randn(len(slices), rank, k, dtype=bf16) * k ** -0.5, randn(n, rank, dtype=bf16) * rank ** -0.5,
                         None, 0.1, scale=torch.tensor([2.0, 0.5, 1.0], device=device), slices=slices)
    finish(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--emulate", action="store_true", help="with --device cpu: the CUDA kernels, emulated")
    args = parser.parse_args()
    if args.emulate and args.device != "cpu":
        parser.error("--emulate runs the CUDA kernels on CPU tensors: it needs --device cpu")
    with llmkernels.emulator.emulate() if args.emulate else contextlib.nullcontext():
        main(torch.device(args.device))
