"""Where a MeZO sweep's time goes, for the GPU-check issue (docs/mezo.md, "Performance").

    python3 bench/probe_mezo.py [--device cuda|cpu]

Separates the three things that can bound a sweep, each measured in this run on this device:
  memory     a DRAM-resident sweep (one 2 GiB fp32 / 1 GiB bf16 tensor) against a device copy of
             the same bytes;
  generator  the same sweep on a tensor that fits in L2 (16 MiB), repeated: memory is then cheap,
             so elements/s approaches the rate of Philox + Box-Muller; with the next perturbation
             folded in, each element draws two normals, which gives the generator's cost per normal;
  host       perturb_ over 201 tiny tensors: the Python, dispatch and launch time per sweep, which
             a small model's sweep cannot hide.
Prints one line per probe; times are medians of CUDA-event (or wall-clock) measurements.
"""
import argparse
import time

import torch

from llmkernels import mezo
from llmkernels.bench.core import measure


def median_ms(fn, device, repeats=20):
    """Median ms per call of fn(), timed by the benchmark runner's own timer (warm-up included)."""
    return measure(lambda _: fn(), [None], device, repeats=repeats).median


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    big = 2**29 if device.type == "cuda" else 2**24     # elements of the DRAM-resident tensor
    small = 2**22 if device.type == "cuda" else 2**18   # elements that stay in L2

    for dtype in (torch.float32, torch.bfloat16):
        size = torch.finfo(dtype).bits // 8
        x = (torch.randn(big, device=device) * 0.02).to(dtype)
        dst = torch.empty_like(x)
        copy_ms = median_ms(lambda: dst.copy_(x), device)
        seed = iter(range(10**9))
        sweep_ms = median_ms(lambda: mezo.perturb_([x], next(seed), 1e-3), device)
        del dst
        copy_gbs = 2 * big * size / copy_ms / 1e6
        sweep_gbs = 2 * big * size / sweep_ms / 1e6
        print(f"memory    {str(dtype):15s} sweep {sweep_ms:8.3f} ms {sweep_gbs:7.0f} GB/s | copy {copy_ms:8.3f} ms "
              f"{copy_gbs:7.0f} GB/s | sweep/copy {sweep_gbs / copy_gbs:5.1%}")
        del x
        y = (torch.randn(small, device=device) * 0.02).to(dtype)
        one_ms = median_ms(lambda: mezo.perturb_([y], next(seed), 1e-3), device, repeats=50)
        two_ms = median_ms(lambda: mezo.update_([y], next(seed), 1e-6, 0.5, 1e-3, next_seed=next(seed)), device, repeats=50)
        print(f"generator {str(dtype):15s} L2-resident sweep {small / one_ms / 1e6:7.1f} G elements/s; "
              f"with next perturbation {small / two_ms / 1e6:7.1f} G elements/s "
              f"(one extra normal costs {(two_ms - one_ms) / small * 1e6:.3f} ns per element)")

    tiny = [torch.randn(4, device=device) for _ in range(201)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(100):
        mezo.perturb_(tiny, step, 1e-3)
    host_us = (time.perf_counter() - start) / 100 * 1e6
    gpu_ms = median_ms(lambda: mezo.perturb_(tiny, 1, 1e-3), device)
    print(f"host      perturb_ over 201 tiny tensors: {host_us:.0f} us per call on the host, "
          f"{gpu_ms * 1e3:.0f} us per call end to end")


if __name__ == "__main__":
    main()
