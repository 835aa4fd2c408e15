#!/usr/bin/env bash
# The project's one call on a GPU machine (docs/design.md, "GPU verification"): device, install, the whole test suite,
# compute-sanitizer over every bench/sanitize_*.py, the CUDA benchmark of every family, every
# bench/probe_*.py, and a summary table printed last.
#
#   OUT=/path/to/output bash bench/gpu_check.sh      # from the repository root
#
# Settings (environment):
#   OUT                where results go (default bench-out/gpu-check)
#   GPU_CHECK_SECONDS  budget for the whole script (default 540: the summary must come back inside
#                      a run of 570 s, of the 600 s a call may run; the 2026-11-27 H200 run, every
#                      family in, needed about 500 s and ran out at 480 before its last two steps)
#   WHEEL              a prebuilt llmkernels-*.whl to install, built on a CPU machine for the GPU
#                      machine's Python: the release wheel, `bash tools/build_wheels.sh --python
#                      python3.12 --out wheelhouse` (every architecture, 11-17 min on 2 cores;
#                      keep only the .whl in wheelhouse/), or for one GPU only: LLMK_CUDA=ON
#                      LLMK_CUDA_ARCHS=90a python3.12 -m pip wheel --no-deps . -w wheelhouse/
#   WHEELHOUSE         else a folder holding exactly one such wheel (default wheelhouse/); with
#                      neither, the package is built from source here (the slow fallback)
#   SKIP_INSTALL=1     use the llmkernels already installed (a dry run on a machine without a GPU)
#
# At most 8 files come back from a GPU run, so $OUT holds only summary.txt, bench-cuda.json and
# logs.tar.gz (every log: device, install, tests, sanitizers, benchmark, probes).
#
# The emulator-versus-hardware tests (tests/test_vocabulary.py, tests/test_emulator.py: the same test
# kernels on the GPU and under the emulator, compared bit for bit where the hardware is exact) are
# `cuda` tests of the suite, so step 3 runs them; bench/sanitize_testing.py runs them again under the
# sanitizers.
#
# Conventions for the scripts found by glob:
#   bench/sanitize_<family>.py  runs its family's kernels once on CUDA and prints "sanitize: ok"
#       last; it runs under memcheck, and also under the tools named on a line
#       "# sanitize: racecheck synccheck" (for kernels that use shared memory).
#   bench/probe_<family>.py     takes --device cuda; each line it prints to stdout is a result that
#       goes into the summary (its other output goes to stderr).
#
# A failed step is recorded and the next one still runs, except that nothing runs after a failed
# install. Each step's timeout is capped by what is left of the budget, so the summary always
# comes back. CUDA tests that skip count as a failure: a CUDA kernel that never ran has not passed.
set -uo pipefail
shopt -s nullglob   # a glob that matches nothing is an empty list, not its own text

OUT=${OUT:-bench-out/gpu-check}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PATH="/usr/local/cuda/bin:$PATH"   # nvcc for LLMK_CUDA=ON, and compute-sanitizer
export PIP_DISABLE_PIP_VERSION_CHECK=1    # the machine has no network: no lookup to wait for
summary=()
script_start=$SECONDS
budget_seconds=${GPU_CHECK_SECONDS:-540}

record() {   # step name, result text
  summary+=("$(printf '%-16s %s' "$1" "$2")")
}

finish() {   # archive the logs, print the summary last; exit 1 if any step failed or timed out
  local logs=("$LOGS"/*)
  if tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs; then
    record logs "$OUT/logs.tar.gz (${#logs[@]} files)"
    rm -rf "$LOGS"
  else
    record logs "FAILED to archive: the logs stay loose in $LOGS"
  fi
  local failed=0 line
  for line in "${summary[@]}"; do
    case "$line" in *FAILED*|*TIMEOUT*) failed=1 ;; esac
  done
  {
    echo
    echo "== gpu_check summary ($((SECONDS - script_start)) s of a ${budget_seconds} s budget," \
         "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
    printf '%s\n' "${summary[@]}"
  } | tee "$OUT/summary.txt"
  exit "$failed"
}

step_timeout() {   # cap in seconds -> min(cap, seconds left in the budget, less 15 for the summary)
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

name_of() {   # bench/sanitize_mezo.py -> mezo
  local base
  base=$(basename "$1" .py)
  echo "${base#*_}"
}

# 1. device -----------------------------------------------------------------------------------
{
  nvidia-smi
  python3 -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| device',
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
} > "$LOGS/device.txt" 2>&1
record device "$(tail -n 1 "$LOGS/device.txt")"

# 2. install: the prebuilt wheel when there is one, else a build from source --------------------
wheel=${WHEEL:-}
wheelhouse=${WHEELHOUSE:-wheelhouse}
if [ -z "$wheel" ] && [ "${SKIP_INSTALL:-0}" != 1 ]; then
  wheels=("$wheelhouse"/llmkernels-*.whl)
  if [ "${#wheels[@]}" -gt 1 ]; then
    record install "FAILED: ${#wheels[@]} wheels in $wheelhouse/; keep one or set WHEEL=path"
    finish
  fi
  [ "${#wheels[@]}" -eq 1 ] && wheel=${wheels[0]}
fi

step_start=$SECONDS
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  record install "skipped (SKIP_INSTALL=1): the llmkernels already installed"
elif [ -n "$wheel" ]; then
  if [ ! -f "$wheel" ]; then
    record install "FAILED: wheel $wheel not found"
    finish
  fi
  timeout "$(step_timeout 120)" python3 -m pip install --no-deps --force-reinstall "$wheel" > "$LOGS/install.log" 2>&1
  install_rc=$?
  record install "$(describe_rc $install_rc): prebuilt wheel $(basename "$wheel") in $((SECONDS - step_start)) s"
  record spills "not checked here: read ptxas -v in the wheel's own build log"
else
  # The machine has no network: the build requirements must already be there.
  if ! { python3 -c "import scikit_build_core, pybind11" && command -v cmake; } > "$LOGS/preflight.log" 2>&1; then
    record install "FAILED: no wheel, and build requirements missing on this machine (preflight.log)"
    finish
  fi
  LLMK_CUDA=ON LLMK_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=16 timeout "$(step_timeout 300)" \
    python3 -m pip install --no-build-isolation --no-deps -v . > "$LOGS/install.log" 2>&1
  install_rc=$?
  record install "$(describe_rc $install_rc): built from source (no wheel) in $((SECONDS - step_start)) s"
  # ptxas -v prints "N bytes spill stores, M bytes spill loads" per kernel; keep the nonzero ones.
  grep -E '[1-9][0-9]* bytes spill (stores|loads)' "$LOGS/install.log" > "$LOGS/spills.txt"
  if ! grep -q 'ptxas info' "$LOGS/install.log"; then
    record spills "unknown: no ptxas -v output in install.log"
  elif [ -s "$LOGS/spills.txt" ]; then
    record spills "$(wc -l < "$LOGS/spills.txt") kernel(s) spill (spills.txt)"
  else
    record spills "none ($(grep -c 'ptxas info.*Used' "$LOGS/install.log") kernels compiled)"
  fi
fi
if [ "${install_rc:-0}" -ne 0 ]; then
  tail -n 40 "$LOGS/install.log"
  finish
fi
# Run from / so that the installed package is imported, not a source folder.
(cd / && python3 -m llmkernels info && python3 -c "import llmkernels; print(llmkernels.build_info())") \
  >> "$LOGS/device.txt" 2>&1
record installed "$(tail -n 1 "$LOGS/device.txt")"
record kernels "$(grep -m 1 '^CUDA kernels: ' "$LOGS/device.txt")"
cuda_reason=$(cd / && python3 -c "import llmkernels; print(llmkernels.cuda_unusable_reason() or '')" 2>&1 | tail -n 1)
record cuda "$([ -z "$cuda_reason" ] && echo usable || echo "FAILED: not usable: $cuda_reason")"

# 3. tests: the whole suite once (every test runs on CPU and, here, on CUDA; 149-153 s on the H200,
# 2026-11-27) ---------------------------------------------------------------------------------------
step_start=$SECONDS
timeout "$(step_timeout 220)" python3 -m pytest tests -q -rs --junitxml="$LOGS/tests.xml" 2>&1 | tee "$LOGS/tests.log"
tests_rc=${PIPESTATUS[0]}
tests_result=$(describe_rc "$tests_rc")
# CUDA tests that skip exit 0 too: a CUDA kernel that never ran on the GPU has not passed.
if grep -qE 'SKIPPED.*(CUDA|GPU)' "$LOGS/tests.log"; then
  tests_result="FAILED (CUDA tests skipped: $(grep -cE 'SKIPPED.*(CUDA|GPU)' "$LOGS/tests.log") lines)"
fi
record tests "$tests_result: $(pytest_counts "$LOGS/tests.log") ($((SECONDS - step_start)) s)"

# 4. compute-sanitizer over every bench/sanitize_*.py ------------------------------------------
# memcheck over every script here; the slower racecheck and synccheck (scripts that name them on a
# "# sanitize:" line) after the benchmark, so that a tight budget still measures every family.
sanitizer=$(command -v compute-sanitizer || true)
scripts=(bench/sanitize_*.py)
[ "${#scripts[@]}" -eq 0 ] && record sanitize "FAILED: no bench/sanitize_*.py found"
run_sanitizers() {   # "memcheck" or "extra": which tools to run over every script
  local script name tools tool label log verdict sanitize_rc foreign ours displayed
  for script in "${scripts[@]}"; do
    name=$(name_of "$script")
    if [ "$1" = memcheck ]; then tools=memcheck; else tools=$(sed -n 's/^# sanitize://p' "$script" | head -n 1); fi
    for tool in $tools; do
      label="$tool:$name"
      if [ -z "$sanitizer" ]; then
        record "$label" "FAILED: compute-sanitizer not found"
        continue
      fi
      step_start=$SECONDS
      log="$LOGS/sanitize-$name-$tool.log"
      # Without torch's caching allocator each tensor is its own allocation, so memcheck sees an
      # access past a tensor's end instead of a silent write into a neighbour in the pool.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(step_timeout 120)" "$sanitizer" --tool "$tool" --error-exitcode 1 \
        python3 "$script" > "$log" 2>&1
      sanitize_rc=$?
      verdict=$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | tail -n 1 | sed 's/^=* *//')
      grep -q '^sanitize: ok' "$log" || verdict="${verdict:+$verdict; }script did not finish: $(grep -v '^=====' "$log" | tail -n 1)"
      # racecheck reports hazards in cuBLAS's Hopper kernels (nvjet_sm90_*, torch's matmuls in a
      # backward; synchronized by TMA and mbarriers), which are not ours: 4 on the H200, 2026-11-27.
      # Filtering them out with --kernel-name(-exclude) crashed racecheck there ("Internal Sanitizer
      # Error"), so the whole run is checked and only hazards in other kernels fail the step.
      if [ "$tool" = racecheck ] && [ "$sanitize_rc" -eq 1 ] && grep -q '^sanitize: ok' "$log"; then
        foreign=$(grep -cE 'Race reported between .* access at (void )?(nvjet|cutlass::|[A-Za-z0-9_]*xmma|cublas)' "$log")
        ours=$(( $(grep -c 'Race reported between' "$log") - foreign ))
        # ... and the reports printed are all it found (none left unprinted past a print limit)
        displayed=$(sed -n 's/.*RACECHECK SUMMARY: \([0-9]*\) hazards\{0,1\} displayed.*/\1/p' "$log" | tail -n 1)
        if [ "$ours" -eq 0 ] && [ "$foreign" -gt 0 ] && [ "${displayed:-x}" = "$foreign" ] \
           && ! grep -q 'Internal Sanitizer Error' "$log"; then
          sanitize_rc=0
          verdict="0 hazards in our kernels ($verdict, all in cuBLAS/CUTLASS kernels)"
        fi
      fi
      record "$label" "$(describe_rc "$sanitize_rc"): ${verdict:-no summary line} ($((SECONDS - step_start)) s)"
    done
  done
}
run_sanitizers memcheck

# 5. benchmark: every family's cases against their anchors --------------------------------------
# (--quick: the families' full CUDA case lists, attention's 44 cases with three SDPA backends among
# them, need several minutes; the quick lists fit the step's 150 s. Each case is written to the JSON
# as it finishes, so a timeout keeps what was measured.)
step_start=$SECONDS
timeout "$(step_timeout 150)" python3 -m llmkernels bench --device cuda --quick --out "$OUT/bench-cuda.json" 2>&1 \
  | tee "$LOGS/bench.log"
bench_rc=${PIPESTATUS[0]}
bench_result="$(describe_rc "$bench_rc") ($((SECONDS - step_start)) s)"
[ "$bench_rc" -ne 0 ] && bench_result+=": $(tail -n 1 "$LOGS/bench.log")"
record bench "$bench_result"
if [ -s "$OUT/bench-cuda.json" ]; then
  record bench "$(python3 -c '
import json, sys
records = json.load(open(sys.argv[1]))["records"]
errors = sum("error" in r for r in records)
wide = sum(bool(r.get("spread_too_wide")) for r in records)
print(f"{len(records)} cases, {errors} errors, {wide} with a spread too wide to trust (bench-cuda.json)")
' "$OUT/bench-cuda.json" 2>&1 | tail -n 1)"
fi
while IFS= read -r target; do
  record target "$target"
done < <(grep -E '^  (meets|below|n/a) ' "$LOGS/bench.log" | sed 's/^ *//')

# 6. racecheck and synccheck for the scripts whose kernels use shared memory -------------------
run_sanitizers extra

# 7. probes: where each family's time goes ------------------------------------------------------
for script in bench/probe_*.py; do
  name=$(name_of "$script")
  step_start=$SECONDS
  timeout "$(step_timeout 60)" python3 "$script" --device cuda > "$LOGS/probe-$name.log" 2> "$LOGS/probe-$name.err"
  probe_rc=$?
  probe_result="$(describe_rc "$probe_rc") ($((SECONDS - step_start)) s)"
  [ "$probe_rc" -ne 0 ] && probe_result+=": $(tail -n 1 "$LOGS/probe-$name.err")"
  record "probe:$name" "$probe_result"
  while IFS= read -r line; do
    record "probe:$name" "$line"
  done < <(head -n 20 "$LOGS/probe-$name.log")
done

finish
