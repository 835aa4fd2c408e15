"""The quantized GEMM's CUDA kernels once on CUDA for compute-sanitizer (bench/gpu_check.sh runs it
under each tool): int4 pack and unpack; W4A16 on every tiling (small M <= 16 with split-K, medium,
large at 1100 x 2056), every group size, symmetric and not, bf16 and fp16; the per-token quantization
(with and without SmoothQuant factors, rows longer than its block); W8A8 on every tiling with K = 8
mod 16 (8-byte copies) and not, raw int32 accumulators; W8A16 on every tiling. Shapes have odd M
and N, K multiples of 8 (and of the group) but of nothing larger where the format allows. The
kernels use shared memory, cp.async and barriers. (The same workload passes under the emulator on CPU
tensors: no report, no bank conflict.) The large tiling's shapes run in bf16 only: the sanitizers'
time grows with the grid.
# sanitize: racecheck synccheck
"""
import torch

from _sanitize_util import finish

from llmkernels import quant

INT4_SHAPES = ((1, 40, 288, 32), (5, 24, 1024, 128), (16, 72, 2752, 64), (17, 40, 384, -1), (130, 136, 256, 128),
               (1100, 2056, 96, 32))
INT8_SHAPES = ((1, 8, 8), (5, 24, 1032), (16, 72, 2744), (130, 136, 200), (300, 264, 96), (1100, 2056, 40))


def main() -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator)
    results = []
    for dtype in (torch.bfloat16, torch.float16):
        for m, n, k, group_size in INT4_SHAPES:
            if m >= 1000 and dtype == torch.float16:
                continue   # the large tiling once (the sanitizers' time goes with the grid size)
            weight = quant.quantize_int4((randn(n, k) * k ** -0.5).to(device), group_size=group_size,
                                         symmetric=m % 2 == 1, scale_dtype=dtype)
            codes = quant.unpack_int4(weight.packed, k)
            if not torch.equal(quant.pack_int4(codes), weight.packed):
                raise SystemExit(f"sanitize: pack(unpack) differs for {n} x {k}")
            x = randn(m, k).to(dtype=dtype, device=device)
            results.append(quant.int4_linear(x, weight, randn(n).to(device)))
    for m, n, k in INT8_SHAPES:
        weight = quant.quantize_int8((randn(n, k) * k ** -0.5).to(device))
        smoothed = quant.quantize_int8((randn(n, k) * k ** -0.5).to(device), smooth=(torch.rand(k, generator=generator) + 0.5).to(device))
        for dtype in (torch.bfloat16,) if m >= 1000 else (torch.bfloat16, torch.float16):
            x = randn(m, k).to(dtype=dtype, device=device)
            results.append(quant.int8_linear(x, weight, randn(n).to(device)))
            results.append(quant.int8_linear(x, smoothed))
            results.append(quant.int8_linear(x, weight, activations="fp"))
        codes, scales = quant.quantize_per_token(randn(m, k).to(device))
        results.append(scales)
        results.append(quant.int8_matmul(codes, weight.data).float())
    finish(results)


if __name__ == "__main__":
    main()
