#!/usr/bin/env bash
# Builds the C++ CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy of
# the tree (build/asan-src, so the normal in-place build is untouched) and runs the CPU tests,
# including the property-based fuzz profile, under them (`make sanitize`, in CI); with the argument
# `cuda`, the CUDA kernels' tests under the SIMT emulator (tests/cuda_emu, built with the same flags;
# `make sanitize-cuda`). Any report fails the run.
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
export QSPARSE_SANITIZE_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g1"
MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace > build.log 2>&1 || {
  tail -n 40 build.log; exit 1; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# The files whose tests run the C++ CPU kernels on many shapes (test_cpu_topk has the NaN-payload
# cases that once found a heap overrun); the model, Triton, packaging, argument-check (ops_contract,
# reliability: Python-side checks, subprocesses) and ptxas tests add no C++ coverage beyond these. `scripts/sanitize.sh cuda` runs the CUDA kernels'
# tests under the SIMT emulator instead (tests/cuda_emu, same flags; ~20 min on 2 cores, so not in CI).
if [ "${1:-}" = cuda ]; then
  tests="tests/test_cuda_kernels.py tests/test_cuda_launches.py"
else
  tests="tests/test_cpu_topk.py tests/test_cpu_sparse_linear.py tests/test_cpu_sparse_linear_batch.py
    tests/test_cpu_ternary.py tests/test_cpu_ternary_batch.py tests/test_native_quantize.py
    tests/test_fused_siblings.py tests/test_threads_determinism.py tests/test_fuzz.py
    tests/test_cpu_dense_gemv.py tests/test_rms_norm.py tests/test_cpu_attention.py"
  export QSPARSE_FUZZ_BACKENDS=reference,cpu  # the emulated CUDA kernels: `scripts/sanitize.sh cuda`
fi
echo "[sanitize] running $(echo $tests | wc -w) test files under ASan/UBSan"
"$PY" -m pytest -q -p no:cacheprovider --durations=15 -n "${QSPARSE_TEST_JOBS:-auto}" --dist worksteal $tests
