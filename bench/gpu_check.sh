#!/usr/bin/env bash
# The project's one call on a GPU machine (shared/GPU.md): device, build, CUDA tests, the whole
# suite, compute-sanitizer memcheck, the CUDA benchmark, the MeZO time probe, and a summary table last.
#
#   OUT=/path/to/output bash bench/gpu_check.sh      # from the repository root
#
# Every log and the benchmark JSON go under $OUT; the summary goes to stdout and $OUT/summary.txt.
# A failed step is recorded and the next one still runs, except that nothing runs after a failed
# build. Each step has a timeout so that the summary always comes back; the whole script is meant
# to take under 7 minutes on an H100.
set -uo pipefail

OUT=${OUT:-bench-out/gpu-check}
mkdir -p "$OUT"
summary=()
script_start=$SECONDS

record() {   # step name, result text
  summary+=("$(printf '%-10s %s' "$1" "$2")")
}

finish() {
  {
    echo
    echo "== gpu_check summary ($((SECONDS - script_start)) s, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
    printf '%s\n' "${summary[@]}"
  } | tee "$OUT/summary.txt"
  exit "$1"
}

# Every step's timeout is capped by what is left of the whole run's budget, so the summary comes
# back inside one device call (600 s at most) even when a step hangs.
budget_seconds=${GPU_CHECK_SECONDS:-540}
step_timeout() {   # cap in seconds -> min(cap, seconds left before the budget, less 15 for the summary)
  local left=$((budget_seconds - (SECONDS - script_start) - 15))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# A timeout or failure of `cmd | tee` shows in PIPESTATUS[0]; 124 means the timeout fired.
describe_rc() {
  case "$1" in
    0) echo "ok" ;;
    124) echo "TIMEOUT" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}

pytest_counts() {   # the final "N passed, M skipped in Ts" line of a pytest log
  grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$1" | tail -n 1 | tr -d '=' | xargs
}

# 1. device -----------------------------------------------------------------------------------
{
  nvidia-smi
  python3 -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| device',
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
} > "$OUT/device.txt" 2>&1
record device "$(tail -n 1 "$OUT/device.txt")"

# 2. build ------------------------------------------------------------------------------------
# The machine has no network: the build requirements must already be there.
if ! { python3 -c "import scikit_build_core, pybind11" && command -v cmake; } > "$OUT/preflight.log" 2>&1; then
  record build "FAILED: build requirements missing on this machine (preflight.log)"
  finish 1
fi
step_start=$SECONDS
LLMK_CUDA=ON LLMK_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=16 timeout "$(step_timeout 300)" \
  python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1
build_rc=$?
record build "$(describe_rc $build_rc) in $((SECONDS - step_start)) s (build.log)"
if [ "$build_rc" -ne 0 ]; then
  tail -n 40 "$OUT/build.log"
  finish 1
fi
# ptxas -v prints "N bytes spill stores, M bytes spill loads" per kernel; keep the nonzero ones.
grep -E '[1-9][0-9]* bytes spill (stores|loads)' "$OUT/build.log" > "$OUT/spills.txt"
if ! grep -q 'ptxas info' "$OUT/build.log"; then
  record spills "unknown: no ptxas -v output in build.log"
elif [ -s "$OUT/spills.txt" ]; then
  record spills "$(wc -l < "$OUT/spills.txt") kernel(s) spill (spills.txt)"
else
  record spills "none ($(grep -c 'ptxas info.*Used' "$OUT/build.log") kernels compiled)"
fi
# Run from / so that the installed package is imported, not a source folder.
(cd / && python3 -c "import llmkernels; print(llmkernels.build_info())") >> "$OUT/device.txt" 2>&1
record installed "$(tail -n 1 "$OUT/device.txt")"

# 3. tests: the whole suite once (every test runs on CPU and, here, on CUDA) ---------------------
step_start=$SECONDS
timeout "$(step_timeout 240)" python3 -m pytest tests -q -rs --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
tests_result=$(describe_rc "$tests_rc")
# CUDA tests that skip exit 0 too: a CUDA kernel that never ran on the GPU has not passed.
if grep -qE 'SKIPPED.*(CUDA|GPU)' "$OUT/tests.log"; then
  tests_result="FAILED (CUDA tests skipped: $(grep -cE 'SKIPPED.*(CUDA|GPU)' "$OUT/tests.log") lines)"
fi
record tests "$tests_result: $(pytest_counts "$OUT/tests.log") ($((SECONDS - step_start)) s)"

# 4. compute-sanitizer ------------------------------------------------------------------------
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
# racecheck joins memcheck here when a kernel uses shared memory (the MeZO kernel uses none).
sanitizer_tools="memcheck"
for tool in $sanitizer_tools; do
  if [ -z "$sanitizer" ]; then
    record "$tool" "not run: compute-sanitizer not found"
    continue
  fi
  step_start=$SECONDS
  # Without torch's caching allocator each tensor is its own allocation, so memcheck sees an
  # access past a tensor's end instead of a silent write into a neighbour in the pool.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(step_timeout 150)" "$sanitizer" --tool "$tool" --error-exitcode 1 \
    python3 bench/sanitize_mezo.py > "$OUT/sanitize-$tool.log" 2>&1
  sanitize_rc=$?
  verdict=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$OUT/sanitize-$tool.log" | tail -n 1 | sed 's/^=* *//')
  grep -q '^sanitize: ok' "$OUT/sanitize-$tool.log" || verdict="${verdict:+$verdict; }script did not finish"
  record "$tool" "$(describe_rc "$sanitize_rc"): ${verdict:-no summary line} ($((SECONDS - step_start)) s)"
done

# 5. benchmark --------------------------------------------------------------------------------
step_start=$SECONDS
timeout "$(step_timeout 200)" python3 -m llmkernels bench --device cuda --out "$OUT/bench-cuda.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
record bench "$(describe_rc "$bench_rc") ($((SECONDS - step_start)) s; bench.log, bench-cuda.json)"
while IFS= read -r target; do
  record target "$target"
done < <(grep -E '^  (meets|below|n/a) ' "$OUT/bench.log" | sed 's/^ *//')

# 6. where a sweep's time goes: memory vs generator vs host (for the MeZO performance issue) --------
step_start=$SECONDS
timeout "$(step_timeout 90)" python3 bench/mezo_probe.py --device cuda 2>&1 | tee "$OUT/probe.log"
probe_rc=${PIPESTATUS[0]}
record probe "$(describe_rc "$probe_rc") ($((SECONDS - step_start)) s; probe.log)"
while IFS= read -r line; do
  record probe "$line"
done < <(grep -E '^(memory|generator|host) ' "$OUT/probe.log")

failed=0
for line in "${summary[@]}"; do
  case "$line" in *FAILED*|*TIMEOUT*) failed=1 ;; esac
done
finish "$failed"
