"""The ``triton`` backend: every Triton kernel against the reference (cases in ``triton_cases.py``).

* With a CUDA GPU: the cases run here, natively on CUDA tensors.
* Under ``TRITON_INTERPRET=1``: the cases run here, on CPU tensors through Triton's interpreter.
* Otherwise (a CPU-only ``pytest tests/``): the interpreter has to be switched on before triton and
  qsparse_kernels are imported, and both already are (conftest), with the backend status cached
  for the rest of the process. So one test runs this file again in a child pytest with
  ``TRITON_INTERPRET=1`` and fails with the child's report if any case fails; the other test files
  keep running without the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    from tests.triton_cases import *  # noqa: F403  (the test functions are collected from here)
else:
    CHILD_TIMEOUT_S = 900

    def test_triton_kernels_under_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1", QSPARSE_FUZZ="interpreter", QSPARSE_FUZZ_BACKENDS="triton")
        fuzz = os.path.join(os.path.dirname(__file__), "test_fuzz.py")  # the property tests, on triton
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__, fuzz]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        report = (r.stdout[-12000:] + "\n" + r.stderr[-4000:]).strip()
        print(report)  # shown with -s / -rP: the child's summary line (passed count, seed)
        assert r.returncode == 0, f"the Triton interpreter run failed:\n{report}"
