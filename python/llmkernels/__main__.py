"""`python -m llmkernels <command>`. Commands: bench (the microbenchmark runner)."""
from __future__ import annotations

import sys

USAGE = """usage: python -m llmkernels <command> [options]

commands:
  bench    run the microbenchmarks against their anchors (python -m llmkernels bench --help)"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] != "bench":
        print(USAGE, file=sys.stderr)
        return 2
    from .bench.runner import main as bench   # imports torch and the extension only when needed
    return bench(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
