#!/usr/bin/env bash
# Builds the C++ CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy of
# the tree (build/asan-src, so the normal in-place build is untouched) and runs the CPU tests,
# including the property-based fuzz profile, under them, and the CUDA kernels' tests under the SIMT
# emulator (tests/cuda_emu, built with the same flags). Any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
SRC=build/asan-src
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +  # keep its ninja build dir
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$SRC"
cd "$SRC"
echo "[sanitize] building with -fsanitize=address,undefined (CPU only)"
export QSPARSE_BUILD_CUDA=0
# The one list of sanitizer flags: setup.py and the emulated CUDA kernels' build (tests/cuda_emu) read it.
export QSPARSE_SANITIZE_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace > build.log 2>&1 || {
  tail -n 40 build.log; exit 1; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# The CPU kernels' tests; the Triton interpreter and Hugging Face model tests add no C++ coverage.
tests=$(ls tests/test_*.py | grep -v -e test_triton -e test_hf_ -e test_bench_llama)
echo "[sanitize] running $(echo "$tests" | wc -w) test files under ASan/UBSan"
"$PY" -m pytest -q -p no:cacheprovider $tests
