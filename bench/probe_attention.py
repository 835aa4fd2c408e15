"""Where the attention kernels' LSE error comes from, for the GPU-check issue (docs/attention.md, "Status").

    python3 bench/probe_attention.py [--device cuda|cpu]

On an H200 (2026-11-27) the LSE of the ALiBi parity case was 2.35x torch's fp32 error, against the parity
rule's 2x, while the same CUDA source under the emulator is 0.82x. The rule's baseline is torch in
fp32 on the CPU. flash-attn's version of the rule computes it on the GPU, where torch's expf is not
correctly rounded either. This probe prints, per case, the largest LSE error against the float64
reference of:
  kernel     the CUDA kernel on --device (its fp32 LSE);
  torch cpu  the reference in fp32 on the CPU (the tests' baseline today);
  torch dev  the reference in fp32 on --device (with TF32 off);
  emulated   the same CUDA source under the SIMT emulator (small cases only),
and the kernel's error as a multiple of each torch error. The cases are the parity tests' (the same
seeds), and one at a training size without the emulator. One line per case.
"""
import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import llmkernels  # noqa: E402
from test_attention import attention, inputs, rand, reference  # noqa: E402


def lse_error(lse, oracle):
    finite = torch.isfinite(oracle)
    return (lse.double().cpu() - oracle)[finite].abs().max().item()


def probe(name, q, k, v, device, emulate, **options):
    cpu = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    on = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
    oracle = reference.attention(qc.double(), kc.double(), vc.double(), return_lse=True, **cpu)[1]
    errors = {"kernel": lse_error(attention.forward(q.to(device), k.to(device), v.to(device), **on)[1], oracle),
              "torch cpu": lse_error(reference.attention(qc, kc, vc, return_lse=True, **cpu)[1], oracle),
              "torch dev": lse_error(reference.attention(q.to(device), k.to(device), v.to(device), return_lse=True,
                                                         **on)[1], oracle)}
    if emulate:
        with llmkernels.emulator.emulate():
            errors["emulated"] = lse_error(attention.forward(qc, kc, vc, **cpu)[1], oracle)
    kernel = errors["kernel"]
    parts = [f"kernel {kernel:.3e}"] + [f"{key} {value:.3e} (kernel {kernel / value:.2f}x)" if value > 0 else
                                        f"{key} {value:.3e}" for key, value in errors.items() if key != "kernel"]
    print(f"lse {name}: " + " | ".join(parts), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    # On the CPU, "kernel" is the CPU kernel unless the CUDA source is emulated (as the tests' emu device).
    context = llmkernels.emulator.emulate() if device.type == "cpu" else contextlib.nullcontext()
    q, k, v = inputs(70, 90, 4, 2, 64, torch.bfloat16, seed=5)
    slopes = rand((4,), seed=31, device="cpu")
    with context:
        probe("alibi causal bf16 70x90 h4/2 d64 (test_softcap_alibi_and_scale)", q, k, v, device, True,
              alibi_slopes=slopes, causal=True)
        probe("softcap 20 bf16 70x90 h4/2 d64 (test_softcap_alibi_and_scale)", q, k, v, device, True, softcap=20.0)
        q, k, v = inputs(20, 30, 2, 2, 136, torch.float16)
        probe("fp16 20x30 h2/2 d136 (test_forward_matches_reference)", q, k, v, device, True)
    if device.type == "cuda":
        q, k, v = inputs(1024, 1024, 16, 16, 128, torch.bfloat16, batch=2, seed=7)
        probe("causal bf16 2x1024 h16 d128", q, k, v, device, False, causal=True)


if __name__ == "__main__":
    main()
