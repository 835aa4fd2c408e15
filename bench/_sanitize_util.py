"""Shared by bench/sanitize_*.py (not itself one: gpu_check.sh runs sanitize_*.py)."""
import torch


def finish(results) -> None:
    """Waits for the GPU (when the script used one: a dry run on CPU tensors did not), fails on a
    non-finite result (an output a kernel did not write, or wrote wrong), then prints the line
    gpu_check.sh looks for."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    for index, y in enumerate(results):
        if not torch.isfinite(y).all():
            raise SystemExit(f"sanitize: non-finite values in result {index} ({y.dtype}, {tuple(y.shape)})")
    print("sanitize: ok")
