#!/usr/bin/env bash
# A/B of the `cuda` backend's kernels on one GPU lease: this checkout ("new") against an older
# source tree ("old"), built side by side on the device and timed in alternating processes, so
# both columns come from the same machine and the same minutes (SPEC: ratios from one run).
#
# Prepare the old tree here (it must travel with the call), then run it on the device machine:
#
#     mkdir -p .gpu_old && git archive REF csrc qsparse_kernels benchmarks setup.py pyproject.toml \
#         scripts | tar -x -C .gpu_old && echo /.gpu_old/ >> .git/info/exclude
#     bash benchmarks/gpu_ab.sh .gpu_old          # device call, with .gpu_old carried
#
# Stages (~2.5 minutes on an H200 with 16 cores, the builds ~50 s of it): both builds at once
# (sm_90 only); `ldd` of the new build's libstdc++; the CUDA kernel tests on the new build; then
# benchmarks/bench_gpu.py --backends cuda, graph and eager, ROUNDS (default 2) alternating rounds at
# the decode shape 4096 -> 14336 (M = 1, 4, 16) and one round at 14336 -> 4096 and 2048 -> 5632
# (M = 1); Nsight Compute on the new build's M = 1 kernels where `ncu` runs; the compact TinyLlama
# decode on the new build. The last lines are the graph-mode table: time in us and x cuBLAS per
# round, old against new. Logs under $OUT (or a temporary folder).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OLD=${1:?usage: bash benchmarks/gpu_ab.sh OLD_TREE}
[ -f "$OLD/setup.py" ] || { echo "gpu_ab: $OLD has no setup.py"; exit 2; }
ROUNDS=${ROUNDS:-2}
PY=${PYTHON:-$(command -v python || command -v python3)}
LOG=${OUT:-$(mktemp -d)}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 QSPARSE_CUDA_ARCHS=${QSPARSE_CUDA_ARCHS:-90} QSPARSE_BUILD_CUDA=1
unset TRITON_INTERPRET QSPARSE_BACKEND
L=$LOG/ab.log
: > "$L"
say() { echo "=== $* (t=${SECONDS}s)" | tee -a "$L"; }
jobs=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))

say build "(old and new side by side, MAX_JOBS=$jobs each)"
(cd "$OLD" && MAX_JOBS=$jobs "$PY" setup.py -q build_ext --inplace > "$LOG/build_old.log" 2>&1
 echo "old build rc $?" >> "$LOG/build_old.log") &
MAX_JOBS=$jobs "$PY" setup.py -q build_ext --inplace > "$LOG/build_new.log" 2>&1
echo "new build rc $?" | tee -a "$L"
wait
tail -n 1 "$LOG/build_old.log" | tee -a "$L"
ldd qsparse_kernels/_C*.so | grep -i 'libstdc' | tee -a "$L"

say tests "(new build)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_cuda_kernels.py -k "not emulated" \
    > "$LOG/tests.log" 2>&1
echo "tests rc $?: $(tail -n 1 "$LOG/tests.log")" | tee -a "$L"

bench() {  # bench VARIANT DIR ROUND SHAPE-ARGS...: one bench_gpu.py process, graph rows into the log
    local v=$1 dir=$2 r=$3
    shift 3
    say "bench $v round $r $*"
    (cd "$dir" && OUT='' timeout 120 "$PY" benchmarks/bench_gpu.py --backends cuda --reps 30 "$@" 2>&1 |
        grep -v '^spot check\|backend:') >> "$L"
}
for r in $(seq 1 "$ROUNDS"); do
    for v in old new; do
        dir=.
        [ "$v" = old ] && dir=$OLD
        bench "$v" "$dir" "$r" --batch 1 4 16
        if [ "$r" = 1 ]; then
            bench "$v" "$dir" "$r" --batch 1 --in-features 14336 --out-features 4096
            bench "$v" "$dir" "$r" --batch 1 --in-features 2048 --out-features 5632
        fi
    done
done

if command -v ncu > /dev/null; then
    say "ncu (new build, M = 1, 4096 -> 14336 bf16, s = 0.5)"
    cat > "$LOG/ncu_case.py" <<'PYEOF'
import torch
import qsparse_kernels as qk
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
w = (torch.randn(14336, 4096, device="cuda") / 64).to(torch.bfloat16)
packed, scale = qk.quantize_weight_ternary(w.float(), backend="reference")
w = qk.to_fast_layout(w)
k_t = qk.sparsity_to_k(4096, 0.6125)
for _ in range(3):
    torch.ops.qsparse.topk_sparsify_kernel(x, 2048)
    torch.ops.qsparse.sparse_linear_kernel(x, w, 2048, None)
    torch.ops.qsparse.ternary_linear_kernel(x, packed, scale, 14336, k_t, None)
torch.cuda.synchronize()
PYEOF
    PYTHONPATH=$PWD timeout 120 ncu --clock-control none -k 'regex:topk_sparsify|sparse_linear|ternary_linear' -s 3 \
        -c 3 --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \
        "$PY" "$LOG/ncu_case.py" > "$LOG/ncu.txt" 2>&1
    grep -E '^  [a-z_]+_kernel|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per Issued' \
        "$LOG/ncu.txt" | tee -a "$L"
fi

say "decode (new build, compact TinyLlama, eager, 5 rounds)"
timeout 120 "$PY" -m qsparse_kernels.bench.decode --device cuda --rounds 5 --new-tokens 16 --no-llc-row --out '' \
    > "$LOG/decode.log" 2>&1
tail -n 9 "$LOG/decode.log" | tee -a "$L"

say "table (graph mode: us and x cuBLAS per round)"
"$PY" - "$L" <<'PYEOF' | tee -a "$L"
import collections, re, sys
rows = collections.defaultdict(list)
for sec in re.split(r"^=== ", open(sys.argv[1]).read(), flags=re.M):
    m = re.match(r"bench (\w+) round \d+ (.*?) \(t=", sec)
    if not m:
        continue
    shape = re.search(r"--in-features (\d+) --out-features (\d+)", m.group(2))
    shape = f"{shape[1]}->{shape[2]}" if shape else "4096->14336"
    base = {}
    for line in sec.splitlines():
        f = re.match(r"(F\.linear \(cuBLAS\)|sparse_linear|ternary_linear|topk_sparsify|sparse fused)\s+\S+\s+graph\s+"
                     r"(\d+)\s+([\d.]+)\s+([\d.]+)", line)
        if not f:
            continue
        op, M, s, us = f[1], f[2], f[3], float(f[4])
        if op.startswith("F.linear"):
            base[M] = us
            continue
        ratio = f" {base[M] / us:.2f}x" if M in base and op != "topk_sparsify" else ""
        rows[(shape, op, s, int(M), m.group(1))].append(f"{us:.1f} us{ratio}")
print(f"{'shape':<12} {'op':<15} {'s':>6} {'M':>3}  {'old (per round)':<34} new (per round)")
for key in sorted({k[:4] for k in rows}):
    old, new = " / ".join(rows.get((*key, "old"), [])), " / ".join(rows.get((*key, "new"), []))
    print(f"{key[0]:<12} {key[1]:<15} {key[2]:>6} {key[3]:>3}  {old:<34} {new}")
PYEOF
say done
