#!/usr/bin/env bash
# GPU check of the triton and cuda backends: one command, < 8 minutes on a
# fresh GPU machine (torch 2.11+ with CUDA, Triton 3.6+, nvcc; H100/H200), repo root as cwd:
#
#     bash benchmarks/gpu_check.sh
#
# 1. prints the environment; 2. builds the native extension in place with the machine's own
# torch (no venv, no downloads); 3. prints the GPU benchmark table (benchmarks/bench_gpu.py);
# 4. runs tests/test_triton.py natively on CUDA tensors, then every other test whose name or
# module says "cuda". Logs and bench_gpu.csv go to $OUT when it is set. A failing stage
# does not stop the later ones (the benchmark is still worth seeing); the exit status is that of
# the first failure. Each stage has its own time limit; together they stay under 8 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
LOG=${OUT:-$(mktemp -d)}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}
export QSPARSE_CUDA_ARCHS=${QSPARSE_CUDA_ARCHS:-90}  # H100/H200 only: half the nvcc time
unset TRITON_INTERPRET QSPARSE_BACKEND
status=0
T0=$SECONDS

stage() {  # stage NAME TIMEOUT_S CMD...: run, tee the log, remember the first failure
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s, t=$((SECONDS - T0))s)"
    local rc=0
    timeout --signal=INT --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOG/$name.log" || rc=$?  # pipefail: rc is the command's
    if [ "$rc" -ne 0 ]; then
        echo "=== $name FAILED (exit $rc)"
        [ "$status" -ne 0 ] || status=$rc
    fi
    return 0
}

echo "=== environment"
date -u
uname -srm
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory --format=csv || true
nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not found"
"$PY" - <<'PYEOF' || true
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
PYEOF
git log --oneline -1 2>/dev/null || true

stage build 130 "$PY" setup.py -q build_ext --inplace
stage backends 15 "$PY" -c "import json, qsparse_kernels as qk; print(json.dumps(qk.backend_info(), indent=1))"
# The benchmark before the tests, so that slow test compilation cannot starve it (its own spot
# check compares with the reference first).
stage bench_gpu 85 "$PY" benchmarks/bench_gpu.py
stage test_triton 200 "$PY" -m pytest -q -p no:cacheprovider -rfE --durations=10 tests/test_triton.py
# Every other CUDA test (module or test name containing "cuda"; the emulated-kernel cases already
# ran in CI, on CPU); exit 5 = none collected.
cuda_tests() {
    local rc=0
    "$PY" -m pytest -q -p no:cacheprovider -rfE tests --ignore=tests/test_triton.py -k "cuda and not emulated" || rc=$?
    [ "$rc" -eq 5 ] && rc=0
    return "$rc"
}
stage test_cuda 40 bash -c "$(declare -f cuda_tests); PY='$PY' cuda_tests"
# compute-sanitizer memcheck over the CUDA kernels' tests, where the tool exists.
if command -v compute-sanitizer > /dev/null; then
    stage memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -p no:cacheprovider \
        -x tests/test_cuda_kernels.py -k "(ternary_linear_exact or sparse_linear or topk_distinct) and not emulated"
else
    echo "=== memcheck: compute-sanitizer not found, skipped"
fi

echo
echo "=== done in $((SECONDS - T0))s, exit status $status (logs in $LOG)"
exit "$status"
