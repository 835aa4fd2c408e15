"""The GEMM core once on CUDA for compute-sanitizer (bench/gpu_check.sh runs it under each tool):
every tiling (small M <= 16 with and without split-K, medium, and large at 1100 x 2056), every
epilogue, gathered rows, accumulate, both input dtypes, on shapes whose M, N and K tails are odd (N, K
multiples of 8 but of nothing larger), and an A whose rows are a strided view (lda > K). The kernel
uses shared memory, cp.async and barriers. (The same workload passes under the emulator: 112 GEMM
launches and 14 split-K reductions, no report, no bank conflict.)
# sanitize: racecheck synccheck
"""
import torch

from _sanitize_util import finish

from llmkernels import _gemm

SHAPES = ((1, 8, 8), (5, 24, 40), (3, 40, 1032), (16, 136, 72), (17, 40, 264), (130, 264, 96), (300, 1032, 136), (1100, 2056, 40))
ACTIVATIONS = ("none", "silu", "gelu", "swiglu")


def main() -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device="cpu").manual_seed(0)
    results = []
    for dtype in (torch.bfloat16, torch.float16):
        for m, n, k in SHAPES:
            x = torch.randn(m, k, generator=generator).to(dtype=dtype, device=device)
            w = torch.randn(n, k, generator=generator).to(dtype=dtype, device=device)
            bias = torch.randn(n, generator=generator).to(device)
            scale = torch.rand(m, generator=generator).to(device)
            for activation in ACTIVATIONS:
                results.append(_gemm.gemm(x, w, bias=bias, row_scale=scale, activation=activation))
            results.append(_gemm.gemm(x, w, out_dtype=torch.float32))
            rows = torch.randint(0, m, (m + 3,), generator=generator, dtype=torch.int32).to(device)
            results.append(_gemm.gemm(x, w, rows=rows, col_scale=bias.abs()))
            wide = torch.randn(m, k + 8, generator=generator).to(dtype=dtype, device=device)[:, :k]   # lda > K
            target = torch.randn(m, n, generator=generator).to(device)
            results.append(_gemm.gemm(wide, w, accumulate_into=target))
    finish(results)


if __name__ == "__main__":
    main()
