"""Reliability under bad configuration and adversarial arguments (issue 17).

Each test here failed before the fix it names: the import-time ISA variable, numpy scalars for
``k`` / ``sparsity``, the int32 range of the ternary accumulator, memory on empty inputs, non-finite
weights, atomic checkpoint loading, and top-K ties among NaNs.
"""

import os
import subprocess
import sys

import pytest

import qsparse_kernels as qk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BUILT = qk.backend_info()["cpu"]["built"]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (the variable is read when the library loads)."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)


# ---- 1. QSPARSE_CPU_ISA is read while the shared object loads ----

_REPORT = "import qsparse_kernels as qk; from qsparse_kernels import _native; print(_native._C.cpu_isa()); " \
    "print(qk.backend_info()['cpu']['reason'])"


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
@pytest.mark.parametrize("value", ["AVX512", "garbage", " avx2"])
def test_invalid_cpu_isa_warns_and_uses_detected(value):
    # Before the fix the C++ parser threw while the .so loaded: terminate, exit code 134.
    detected = _python("from qsparse_kernels import _native; print(_native._C.cpu_isa())", QSPARSE_CPU_ISA="")
    assert detected.returncode == 0, detected.stderr
    got = _python(_REPORT, QSPARSE_CPU_ISA=value)
    assert got.returncode == 0, got.stderr
    isa, reason = got.stdout.splitlines()
    assert isa == detected.stdout.strip()
    assert f"QSPARSE_CPU_ISA={value!r}" in reason and "ignored" in reason
    assert "RuntimeWarning" in got.stderr and f"QSPARSE_CPU_ISA={value!r}" in got.stderr


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
def test_valid_cpu_isa_caps_without_warning():
    got = _python(_REPORT, QSPARSE_CPU_ISA="scalar")
    assert got.returncode == 0, got.stderr
    isa, reason = got.stdout.splitlines()
    assert isa == "scalar" and "warning" not in reason and "Warning" not in got.stderr
