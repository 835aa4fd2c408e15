"""The device vocabulary's and the emulator's test kernels (csrc/testing/) on CUDA, for
compute-sanitizer: their GPU tests (marked `cuda`: each runs a kernel on the GPU and compares it with
the emulator) are the workload. They use shared memory, cp.async, ldmatrix, mma and barriers.
# sanitize: racecheck synccheck
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class CountOutcomes:
    def __init__(self):
        self.passed = self.skipped = 0

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.passed += 1
        if report.skipped:
            self.skipped += 1


def main() -> None:
    outcomes = CountOutcomes()
    status = pytest.main(["-q", "-m", "cuda", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_vocabulary.py"), str(ROOT / "tests" / "test_emulator.py")],
                         plugins=[outcomes])
    if status != 0 or outcomes.skipped or not outcomes.passed:
        raise SystemExit(f"sanitize: the GPU tests of the test kernels did not all pass (pytest exit {int(status)}, "
                         f"{outcomes.passed} passed, {outcomes.skipped} skipped)")
    print(f"sanitize: ok ({outcomes.passed} GPU tests)")


if __name__ == "__main__":
    sys.exit(main())
