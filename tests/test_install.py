"""Installing like a library: the package without its compiled extension, and setup.py's CUDA switch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_C = r"""
import sys
sys.modules["qsparse_kernels._C"] = None  # as if the extension was never built
import torch
import qsparse_kernels as qk
info = qk.backend_info()
assert info["reference"]["usable"], info
for name in ("cpu", "cuda"):
    assert not info[name]["built"] and not info[name]["usable"], info
    assert "qsparse_kernels._C could not be imported" in info[name]["reason"], info
    assert "reference backend" in info[name]["reason"] and "pip install" in info[name]["reason"], info
x, w = torch.randn(3, 64), torch.randn(32, 64)
k = qk.sparsity_to_k(64, 0.5)
y = qk.sparse_linear(x, w, k)
assert torch.equal(y, torch.nn.functional.linear(qk.topk_sparsify(x, k, backend="reference"), w))
packed, scale = qk.quantize_weight_ternary(w)
assert qk.ternary_linear(x, packed, scale, 32, k=k).shape == (3, 32)
model = qk.convert(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)),
                   qk.QSparseConfig(sparsity=0.5))
assert model(x).shape == (3, 8)
try:
    qk.sparse_linear(x, w, k, backend="cpu")
except RuntimeError as exc:
    assert "not usable here" in str(exc), exc
else:
    raise AssertionError("the cpu backend ran without _C")
print("ok", info["cpu"]["reason"])
"""


def _run(code: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_without_the_extension_runs_on_reference():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("QSPARSE_BACKEND", None)
    res = _run(WITHOUT_C, env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok qsparse_kernels._C could not be imported")


def _setup_py(flag: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("QSPARSE_BUILD_CUDA", None)
    if flag is not None:
        env["QSPARSE_BUILD_CUDA"] = flag
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_setup_py_builds_cuda_only_for_a_visible_device_by_default():
    res = _setup_py(None)
    assert res.returncode == 0, res.stderr
    cpu_only = "no CUDA device visible, CPU kernels only" in res.stdout
    assert cpu_only != torch.cuda.is_available(), res.stdout


def test_setup_py_rejects_an_unknown_cuda_switch():
    res = _setup_py("yes")
    assert res.returncode != 0
    assert "QSPARSE_BUILD_CUDA must be one of ('0', '1', 'toolkit') or unset, got 'yes'" in res.stderr


def test_extension_links_the_shared_libstdcxx():
    """The built extension needs libstdc++.so.6 (the process's), not a static copy of its own."""
    import importlib

    path = importlib.import_module("qsparse_kernels._C").__file__
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in out, f"{path} does not link the shared libstdc++:\n{out}"


def test_kernel_errors_format_numbers():
    """The extension shares the process's libstdc++: a compiler that links it statically (the GPU
    image's /opt/gcc does) gives the extension its own, uninitialised iostreams, and a C++ check
    whose message holds a number then crashed the process (on the H200) or cut the message short
    before the number (here). setup.py links the libstdc++ that torch has loaded, by its path,
    whatever the compiler's default (on the H200 image, -lstdc++ alone still linked statically)."""
    import qsparse_kernels as qk

    assert qk.backend_info()["cpu"]["built"], "the tests run on a built extension (make build)"
    try:
        torch.ops.qsparse.topk_sparsify_kernel(torch.randn(2, 8), 9)
    except RuntimeError as e:
        assert "k must be in [0, d = 8], got 9" in str(e), str(e)
    else:
        raise AssertionError("k = 9 > d = 8 did not raise")
