#!/usr/bin/env bash
# GPU check of the triton and cuda backends: one command on a fresh GPU machine (torch 2.11+ with
# CUDA, Triton 3.6+, nvcc; H100/H200), repo root as cwd, under 10 minutes in all:
#
#     bash benchmarks/gpu_check.sh            # the check
#     bash benchmarks/gpu_check.sh --dry-run  # preflights and the plan only (no build, no GPU work)
#
# Preflights first, so a missing piece is named before the lease is spent: ninja (without it
# torch builds serially; setup.py then compiles MAX_JOBS sources at once itself, see
# scripts/parallel_compile.py), gcc, Python.h and libcuda (what Triton's first launch compiles and
# links against), nvcc, and whether compute-sanitizer supports this device. Then the stages, each
# under its own time limit, cut to what is left of the 10-minute budget:
#   build       the native extension in place with the machine's own torch (sm_90 only);
#   backends    qk.backend_info();
#   bench_gpu   benchmarks/bench_gpu.py: spot check, then eager and CUDA-graph rows, each printed
#               and appended to $OUT/bench_gpu.csv as measured, $OUT/gpu_roofline.md at the end;
#   test_cuda   tests/test_cuda_kernels.py on the GPU (the emulated cases ran in CI);
#   test_triton tests/test_triton.py natively on CUDA, without the torch.compile tests, over
#               GPU_TEST_JOBS pytest-xdist workers (default 8: Triton's compiles run in parallel);
#   compile     the torch.compile tests of tests/test_triton.py, on their own;
#   decode      the compact TinyLlama decode benchmark on the GPU (qsparse_kernels.bench.decode, eager
#               Python, 5 interleaved rounds), every variant against dense in the same run;
#   memcheck    compute-sanitizer over a few CUDA kernel cases, when the probe says it works here;
#               reported, kept out of the exit status.
# Logs go to $OUT when it is set. A failing stage does not stop the later ones; the exit status is
# that of the first failing stage (memcheck excepted).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-$(command -v python || command -v python3)}
LOG=${OUT:-$(mktemp -d)}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export QSPARSE_CUDA_ARCHS=${QSPARSE_CUDA_ARCHS:-90}  # H100/H200 only: half the nvcc time
export QSPARSE_BUILD_CUDA=${QSPARSE_BUILD_CUDA:-1}
unset TRITON_INTERPRET QSPARSE_BACKEND
BUDGET=${GPU_CHECK_BUDGET_S:-570}  # 10 minutes less a margin for the lease's own start and stop
status=0
T0=$SECONDS
PLANNED=0
PLANNED_S=0

stage() {  # stage NAME LIMIT_S [--no-status] CMD...: run under min(LIMIT, budget left), tee the log
    local name=$1 limit=$2 counts=1
    shift 2
    if [ "$1" = "--no-status" ]; then counts=0; shift; fi
    local left=$((BUDGET - (SECONDS - T0)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$DRY" -eq 1 ]; then
        PLANNED=$((PLANNED + 1))
        PLANNED_S=$((PLANNED_S + limit))
        echo "plan: $name (limit ${limit}s$([ "$counts" -eq 0 ] && echo ", out of the exit status")): $*"
        return 0
    fi
    echo
    if [ "$limit" -lt 10 ]; then
        echo "=== $name SKIPPED: ${left}s left of the ${BUDGET}s budget"
        [ "$counts" -eq 0 ] || [ "$status" -ne 0 ] || status=124
        return 0
    fi
    echo "=== $name (limit ${limit}s, t=$((SECONDS - T0))s)"
    local rc=0
    timeout --signal=INT --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOG/$name.log" || rc=$?  # pipefail: the command's
    if [ "$rc" -ne 0 ]; then
        echo "=== $name FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ": time limit"))"
        [ "$counts" -eq 0 ] || [ "$status" -ne 0 ] || status=$rc
    fi
    return 0
}

echo "=== environment"
date -u
uname -srm
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory --format=csv 2>/dev/null ||
    echo "nvidia-smi: not available"
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

echo
echo "=== preflight"
missing=0
pre() {  # pre WHAT OK? DETAIL
    if [ "$2" -eq 0 ]; then echo "ok      $1: $3"; else echo "MISSING $1: $3"; missing=1; fi
}
if command -v ninja > /dev/null; then
    pre ninja 0 "$(ninja --version) (parallel build, MAX_JOBS=$MAX_JOBS)"
else
    echo "warn    ninja: not found: setup.py compiles MAX_JOBS=$MAX_JOBS sources at once itself" \
         "(scripts/parallel_compile.py; torch alone would build serially, ~207 s for sm_90)"
fi
CC_BIN=${CC:-$(command -v gcc || command -v cc || true)}
pre "C compiler (Triton builds its launcher)" "$([ -n "$CC_BIN" ]; echo $?)" "${CC_BIN:-none on PATH}"
PYH=$("$PY" -c "import sysconfig, os; p = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); print(p if os.path.exists(p) else '')")
pre "Python.h (Triton's launcher includes it)" "$([ -n "$PYH" ]; echo $?)" "${PYH:-not found: install the python3-dev headers}"
LIBCUDA=$( (ldconfig -p 2>/dev/null | grep -m1 -o '/.*libcuda\.so[.0-9]*') || ls /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/lib64/libcuda.so* 2>/dev/null | head -n 1)
pre "libcuda (the driver; Triton links against it)" "$([ -n "$LIBCUDA" ]; echo $?)" "${LIBCUDA:-not found}"
NVCC_V=$(nvcc --version 2>/dev/null | tail -n 1)
pre nvcc "$([ -n "$NVCC_V" ]; echo $?)" "${NVCC_V:-not found: the cuda backend cannot be built}"
SANITIZER=0
if command -v compute-sanitizer > /dev/null; then
    if [ "$DRY" -eq 1 ]; then
        echo "ok      compute-sanitizer: found (the device probe runs in the real check)"
    else
        probe=$(timeout 30 compute-sanitizer --tool memcheck "$PY" -c \
            "import torch; torch.ones(4, device='cuda').add_(1); torch.cuda.synchronize()" 2>&1)
        if [ $? -eq 0 ] && ! grep -qi "not supported" <<< "$probe"; then
            SANITIZER=1
            echo "ok      compute-sanitizer: memcheck runs on this device"
        else
            echo "warn    compute-sanitizer: unusable here, memcheck skipped: $(grep -m1 -i 'error\|not supported' <<< "$probe")"
        fi
    fi
else
    echo "warn    compute-sanitizer: not found, memcheck skipped"
fi
[ "$missing" -eq 0 ] || echo "=== preflight: something above is MISSING; the stages that need it will fail"

stage build 170 "$PY" setup.py -q build_ext --inplace
stage backends 20 "$PY" -c "import json, qsparse_kernels as qk; print(json.dumps(qk.backend_info(), indent=1))"
# The benchmark before the tests, so that slow test compilation cannot starve it.
stage bench_gpu 150 "$PY" benchmarks/bench_gpu.py --reps 30
stage test_cuda 45 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_cuda_kernels.py -k "not emulated"
XDIST=()
"$PY" -c "import xdist" 2> /dev/null && XDIST=(-n "${GPU_TEST_JOBS:-8}")
stage test_triton 120 "$PY" -m pytest -q -p no:cacheprovider -rfE --durations=5 "${XDIST[@]}" tests/test_triton.py \
    -k "not torch_compile"
stage compile 60 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_triton.py -k "torch_compile"
stage decode 90 "$PY" -m qsparse_kernels.bench.decode --device cuda --rounds 5 --new-tokens 32 --no-llc-row \
    --out "$LOG/decode"
if [ "$SANITIZER" -eq 1 ] || [ "$DRY" -eq 1 ]; then
    stage memcheck 45 --no-status compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q \
        -p no:cacheprovider -x tests/test_cuda_kernels.py \
        -k "not emulated and (ternary_linear_exact and 3-4097-130-dtype1 or test_sparse_linear and colmajor-3-4097-130-dtype1)"
fi

echo
if [ "$DRY" -eq 1 ]; then
    echo "=== dry run: $PLANNED stages planned, limits sum to ${PLANNED_S}s (budget ${BUDGET}s; each stage is cut" \
         "to what is left of it when it starts)"
    exit "$missing"
fi
echo "=== done in $((SECONDS - T0))s, exit status $status (logs in $LOG)"
exit "$status"
