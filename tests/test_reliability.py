"""Reliability under bad configuration and adversarial arguments (issue 17).

Each test here failed before the fix it names: the import-time ISA variable, numpy scalars for
``k`` / ``sparsity``, the int32 range of the ternary accumulator, memory on empty inputs, non-finite
weights, atomic checkpoint loading, and top-K ties among NaNs.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

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


# ---- 7. numpy scalars for k / sparsity; hashable configs ----


@pytest.mark.parametrize("backend", ["reference", *(["cpu"] if CPU_BUILT else [])])
def test_numpy_integers_accepted_for_k(backend):
    x = torch.randn(3, 32)
    want = qk.topk_sparsify(x, 5, backend=backend)
    for k in (np.int64(5), np.int32(5), np.uint8(5)):
        assert torch.equal(qk.topk_sparsify(x, k, backend=backend), want)
    want = qk.block_topk_sparsify(x, 2, 8, backend=backend)
    assert torch.equal(qk.block_topk_sparsify(x, np.int64(2), np.int32(8), backend=backend), want)
    w = torch.randn(7, 32)
    assert torch.equal(qk.sparse_linear(x, w, np.int16(5), backend=backend), qk.sparse_linear(x, w, 5, backend=backend))
    packed, scale = qk.quantize_weight_ternary(w)
    assert torch.equal(
        qk.ternary_linear(x, packed, scale, np.int64(7), np.int64(5), backend=backend),
        qk.ternary_linear(x, packed, scale, 7, 5, backend=backend),
    )
    assert torch.equal(qk.unpack_ternary(packed, np.int64(7)), qk.unpack_ternary(packed, 7))


@pytest.mark.parametrize("bad", [True, np.True_, 5.0, np.float32(5), "5", torch.tensor(5)])
def test_k_refuses_non_integers(bad):
    with pytest.raises(TypeError, match="k must be an int"):
        qk.topk_sparsify(torch.randn(2, 8), bad)


def test_numpy_floats_accepted_for_sparsity():
    assert qk.sparsity_to_k(np.int64(10), np.float32(0.6)) == qk.sparsity_to_k(10, float(np.float32(0.6)))
    assert qk.sparsity_to_k(10, np.float64(0.5)) == 5
    assert qk.sparsity_to_k(10, np.int8(0)) == 10
    cfg = qk.QSparseConfig(sparsity=np.float32(0.5))
    assert type(cfg.sparsity) is float and cfg.sparsity == 0.5
    mod = qk.nn.QSparseLinear(16, 4, sparsity=np.float64(0.25), k=None)
    assert mod.kept() == 12
    assert qk.nn.QSparseLinear(16, 4, k=np.int64(3)).kept() == 3


@pytest.mark.parametrize("bad", [True, np.True_, "0.5", torch.tensor(0.5), None])
def test_sparsity_refuses_non_reals(bad):
    with pytest.raises(TypeError, match="sparsity must be a float"):
        qk.sparsity_to_k(10, bad)
    with pytest.raises(TypeError, match="sparsity"):
        qk.QSparseConfig(sparsity=bad)


def test_config_with_sparsity_mapping_is_hashable():
    a = qk.QSparseConfig(sparsity={"*.q_proj": 0.5, "*.down_proj": np.float32(0.6)})
    b = qk.QSparseConfig(sparsity={"*.q_proj": 0.5, "*.down_proj": 0.6000000238418579})
    assert hash(a) == hash(b) and a == b and {a: 1}[b] == 1
    # first match wins, so the order of the patterns is part of the value
    c = qk.QSparseConfig(sparsity={"*.down_proj": 0.6000000238418579, "*.q_proj": 0.5})
    assert a != c
    with pytest.raises(TypeError):
        a.sparsity["*.q_proj"] = 0.1
    assert dict(a.sparsity) == {"*.q_proj": 0.5, "*.down_proj": float(np.float32(0.6))}
