"""`python -m llmkernels <command>`. Commands: bench (the microbenchmark runner), info (what this
install holds and whether its CUDA kernels can run here; `doctor` is the same)."""
from __future__ import annotations

import sys

USAGE = """usage: python -m llmkernels <command> [options]

commands:
  bench    run the microbenchmarks against their anchors (python -m llmkernels bench --help)
  info     this install's build (CUDA architectures, commit), the driver, torch, and whether the CUDA
           kernels can run on this machine, and why not (also: doctor)"""


def info() -> int:
    """Prints build_info() in a few lines, torch's view of the GPUs, and the verdict. Exit status 0."""
    import torch

    from ._ext import build_info
    b = build_info()
    archs = b["cuda_archs"] or "none (a CPU-only build)"
    print(f"llmkernels {b['version']} (commit {b['git_commit']})")
    print(f"  CPU kernels: yes (OpenMP {'on, ' + str(b['openmp_threads']) + ' threads' if b['openmp'] else 'off'});"
          f" SIMT emulator: yes")
    print(f"  CUDA kernels: {archs}")
    print(f"  CUDA runtime {b['cuda_runtime_version']}{' (static)' if b['cuda_compiled'] else ''}, driver {b['cuda_driver_version']}, "
          f"{b['cuda_device_count']} device(s) seen by the runtime")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
          f"torch.cuda.is_available() = {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(d)
            print(f"  cuda:{d} {torch.cuda.get_device_name(d)} (sm_{major}{minor})")
    if b["gpu_usable"]:
        print("CUDA kernels: usable on the current device")
    else:
        print(f"CUDA kernels: not usable here: {b['gpu_unusable_reason']}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] in ("info", "doctor"):
        return info()
    if not argv or argv[0] != "bench":
        print(USAGE, file=sys.stderr)
        return 2
    from .bench.runner import main as bench   # imports torch and the extension only when needed
    return bench(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
