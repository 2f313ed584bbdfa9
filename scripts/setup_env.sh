#!/usr/bin/env bash
# Creates .venv with requirements/dev.txt and builds qsparse_kernels._C in place.
# Idempotent: the install step is skipped while requirements/dev.txt is unchanged, and the
# build is incremental (ninja), so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.requirements.sha
want=$(sha256sum requirements/dev.txt | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements/dev.txt (torch 2.14.1 CUDA build, about 5.5 GB; about a minute)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # Not -q: pip's own lines (one per package collected / installed) are the progress.
  "$VENV/bin/python" -m pip install --progress-bar off -r requirements/dev.txt 2>&1 \
    | { grep --line-buffered -E '^(Collecting|Installing|Successfully|ERROR)' || true; } | sed -u 's/^/[setup]   /' 
  echo "$want" > "$STAMP"
fi
# The in-place package on the venv's path (what an editable install does), so that scripts run
# from anywhere (examples/, benchmarks/) import it.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/qsparse_kernels_inplace.pth"
# The CUDA kernels are compiled and linked wherever nvcc and the CUDA build of torch are (CI too,
# without a GPU); `pip install .` alone builds them only where a CUDA device is visible (setup.py).
export QSPARSE_BUILD_CUDA=${QSPARSE_BUILD_CUDA:-toolkit}
echo "[setup] building qsparse_kernels._C (QSPARSE_BUILD_CUDA=$QSPARSE_BUILD_CUDA; a first build takes a few minutes)"
start=$(date +%s)
# Progress: each ninja step as it starts ([i/n] and its source file), and a line every 20 s while
# one step runs long (the CUDA files); the full log goes to $VENV/build.log.
( while sleep 20; do echo "[setup]   ... still building, $(( $(date +%s) - start ))s"; done ) &
ticker=$!
trap 'kill $ticker 2>/dev/null || true' EXIT
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace 2>&1 | tee "$VENV/build.log" \
  | awk '/^\[[0-9]+\/[0-9]+\]/ { src = "linking"; for (i = 2; i <= NF; i++) if ($i ~ /\.(cpp|cu)$/) src = $i;
                                  sub(".*/csrc/", "csrc/", src); print "[setup]   " $1 " " src; fflush() }' || {
  kill $ticker 2>/dev/null; tail -n 60 "$VENV/build.log"; echo "[setup] build failed (full log: $VENV/build.log)"; exit 1; }
kill $ticker 2>/dev/null
echo "[setup] build done in $(( $(date +%s) - start ))s"
"$VENV/bin/python" -c "import json, qsparse_kernels as q; print(json.dumps({k: (v['usable'], v['reason']) for k, v in q.backend_info().items()}, indent=1))"
