"""Every MeZO op once on CUDA, on the shapes most likely to expose an out-of-bounds or misaligned
access, for compute-sanitizer (bench/gpu_check.sh runs it under memcheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 bench/sanitize_mezo.py

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so an access past a
tensor's end is reported instead of landing unseen in a neighbour inside torch's memory pool.

Shapes: 0, 1, 3 and 5 elements (shorter than one 4-element group), 4097 (one past a 4096-element
chunk), 123457 (many chunks, odd), a 2-D tensor, a contiguous view that starts one element into
its buffer (not 16-byte aligned, and ending exactly at the end of the allocation), and a list of
300 float32 tensors of odd sizes: more than the 256 tensors of one dtype that one launch carries
(96 with CUDA < 12.1), so the sweep is split into several launch batches and the last one is partial.
"""
import torch

from llmkernels import mezo

SIZES = (0, 1, 3, 5, 4097, 123457)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def odd_params(dtype: torch.dtype, device: torch.device) -> list:
    params = [torch.randn(n, device=device).to(dtype) for n in SIZES]
    params.append(torch.randn(3, 7, device=device).to(dtype))
    params.append(torch.randn(1001, device=device).to(dtype)[1:])   # contiguous, misaligned
    return params


def sweep_every_way(params: list, device: torch.device) -> None:
    """Seed and projected gradient as Python values and as device tensors, with and without the
    folded next perturbation, with and without weight decay exemptions."""
    seed = torch.tensor(11, dtype=torch.int64, device=device)
    next_seed = torch.tensor(12, dtype=torch.int64, device=device)
    grad = torch.tensor(0.25, device=device)
    mezo.perturb_(params, 11, 1e-3)
    mezo.perturb_(params, seed, -2e-3)
    mezo.update_(params, 11, 1e-3, 0.25, 1e-3)
    mezo.update_(params, seed, 1e-3, grad, 1e-3, weight_decay=0.01, no_decay=params[:2])
    mezo.update_(params, 11, 1e-3, grad, 1e-3, weight_decay=0.01, next_seed=12)
    mezo.update_(params, seed, 1e-3, 0.25, 1e-3, next_seed=next_seed, next_scale=2e-3)


def main() -> None:
    device = torch.device("cuda")
    lists = [odd_params(dtype, device) for dtype in DTYPES]
    lists.append([p for params in lists for p in params])                                   # mixed dtypes
    # One dtype, 300 tensors: launches of 256 (kTensorsPerLaunch in mezo_cuda.cu) + 44.
    lists.append([torch.randn(1 + 37 * i, device=device) for i in range(300)])
    for params in lists:
        sweep_every_way(params, device)
    for numel in SIZES:
        mezo.noise(11, 3, numel, device=device)
        mezo.noise(torch.tensor(11, device=device), 3, numel, dtype=torch.bfloat16, device=device)
    for fold in (False, True):
        params = [p.requires_grad_() for p in odd_params(torch.float32, device)]   # MeZO skips frozen ones
        optimizer = mezo.MeZO(params, lr=1e-3, eps=1e-3, weight_decay=0.01, fold_perturbation=fold, capturable=True)
        optimizer.step(lambda: sum(p.float().sum() for p in params))
        optimizer.remove_perturbation()
    torch.cuda.synchronize()
    for params in lists:
        for index, p in enumerate(params):
            if not torch.isfinite(p).all():
                raise SystemExit(f"sanitize: non-finite values in tensor {index} ({p.dtype}, {tuple(p.shape)})")
    print("sanitize: ok")


if __name__ == "__main__":
    main()
