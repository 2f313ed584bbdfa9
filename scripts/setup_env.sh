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
  echo "[setup] installing requirements/dev.txt (torch 2.14.1 CUDA build, about 5.5 GB)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements/dev.txt
  echo "$want" > "$STAMP"
fi
# The in-place package on the venv's path (what an editable install does), so that scripts run
# from anywhere (examples/, benchmarks/) import it.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/qsparse_kernels_inplace.pth"
# The CUDA kernels are compiled and linked wherever nvcc and the CUDA build of torch are (CI too,
# without a GPU); `pip install .` alone builds them only where a CUDA device is visible (setup.py).
export QSPARSE_BUILD_CUDA=${QSPARSE_BUILD_CUDA:-toolkit}
echo "[setup] building qsparse_kernels._C (QSPARSE_BUILD_CUDA=$QSPARSE_BUILD_CUDA)"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace > "$VENV/build.log" 2>&1 || {
  tail -n 60 "$VENV/build.log"; echo "[setup] build failed (full log: $VENV/build.log)"; exit 1; }
echo "[setup] build done in $(( $(date +%s) - start ))s"
"$VENV/bin/python" -c "import json, qsparse_kernels as q; print(json.dumps({k: (v['usable'], v['reason']) for k, v in q.backend_info().items()}, indent=1))"
