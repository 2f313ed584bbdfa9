#!/usr/bin/env bash
# A venv with the GPU machine's Python stack (torch 2.11, triton 3.6, the numpy of that image),
# then the CPU-side Triton tests on it under TRITON_INTERPRET=1 (the interpreter, no GPU needed).
# Python 3.12 is what the GPU image has; 3.11 is used where 3.12 is absent (same wheels otherwise).
# Idempotent: the install is skipped while the pins below are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_STACK_VENV:-/tmp/qsparse-gpu-stack}
PY=${PYTHON:-$(command -v python3.12 || command -v python3.11)}
# numpy < 2.4: triton 3.6's interpreter calls int() on 1-element arrays, which numpy 2.4 rejects
# (qsparse_kernels.backends.triton reports it as the reason the backend is not usable).
PINS="torch==2.11.0 triton==3.6.0 numpy==2.3.5 pytest hypothesis"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[gpu-stack] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  echo "[gpu-stack] installing $PINS"
  # The torch CPU wheel's index is not configured here; torch 2.11 comes from the default one.
  "$VENV/bin/python" -m pip install --progress-bar off -q $PINS
  echo "$PINS" > "$VENV/.pins"
fi
"$VENV/bin/python" -c "import torch, triton, numpy; print('[gpu-stack] torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
# The compiled extension (qsparse_kernels._C) is not built for this torch: the package imports
# without it and the Triton tests do not need it.
export PYTHONPATH=$PWD TRITON_INTERPRET=1 QSPARSE_FUZZ=interpreter QSPARSE_FUZZ_BACKENDS=triton
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_fuzz.py tests/test_triton_launches.py "$@"
