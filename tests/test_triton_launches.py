"""One launch per call: ``sparse_linear`` and ``ternary_linear`` at M <= 16 launch exactly one kernel
(selection, quantization, GEMV and split-K reduction fused), and no other tensor work runs on the
device beside it (no fill, no copy). Counted by wrapping the launch method of Triton's kernel
objects (natively ``JITFunction.run``, under ``TRITON_INTERPRET=1`` the interpreter's) and by a
``TorchDispatchMode`` that records every ATen op outside the launches except allocations and views.

Runs where the Triton backend runs: under the interpreter (``tests/test_triton.py`` style: this
file re-runs itself in a child with ``TRITON_INTERPRET=1`` on a machine without a GPU) or on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRET and not torch.cuda.is_available():

    def test_launch_counts_under_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]

else:
    from torch.utils._python_dispatch import TorchDispatchMode

    import qsparse_kernels as qk
    from qsparse_kernels import reference as R
    from qsparse_kernels.triton.sparse_gemv import _sparse_gemv_kernel
    from qsparse_kernels.triton.ternary_gemv import _ternary_gemv_kernel

    DEVICE = "cpu" if INTERPRET else "cuda"
    # ATen ops that launch nothing: allocation, metadata, views.
    NO_LAUNCH = {"empty", "empty_strided", "view", "reshape", "_unsafe_view", "as_strided", "t", "transpose",
                 "expand", "slice", "select", "unsqueeze", "squeeze", "detach", "alias", "lift_fresh"}

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []
            self.launches: list[str] = []
            self.in_kernel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            # (The argument checks read a CPU scale with .item(): host work, no launch; on CUDA it is skipped.)
            host = name == "_local_scalar_dense" and args[0].device.type == "cpu"
            if not self.in_kernel and func.namespace == "aten" and name not in NO_LAUNCH and not host:
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    @pytest.fixture
    def counter(monkeypatch):
        mode = _Count()
        for cls in {type(_sparse_gemv_kernel), type(_ternary_gemv_kernel)}:
            orig = cls.run

            def run(self, *a, _orig=orig, **kw):
                mode.launches.append(getattr(self, "__name__", "?"))
                mode.in_kernel += 1  # the interpreter's own host copies are not launches
                try:
                    return _orig(self, *a, **kw)
                finally:
                    mode.in_kernel -= 1

            monkeypatch.setattr(cls, "run", run)
        return mode

    @pytest.mark.parametrize("m", [1, 16])
    @pytest.mark.parametrize("k_frac", [0.5, None], ids=["s0.5", "dense"])
    def test_one_launch_per_call(counter, m, k_frac, gen):
        d, n = 200, 70  # the interpreter's heuristic config splits d in two: the in-launch split-K reduction runs
        x = torch.randn(m, d, generator=gen).to(DEVICE)
        w = torch.randn(n, d, generator=gen)
        packed, scale = R.quantize_weight_ternary(w)
        w, b = w.t().contiguous().t().to(DEVICE), torch.randn(n, generator=gen).to(DEVICE)
        packed, scale = packed.to(DEVICE), scale.to(DEVICE)
        k = None if k_frac is None else int(d * k_frac)
        calls = []
        if k is not None:
            calls.append(("sparse_linear", lambda: qk.sparse_linear(x, w, k, b, backend="triton")))
        calls.append(("ternary_linear", lambda: qk.ternary_linear(x, packed, scale, n, k, b, backend="triton")))
        for name, call in calls:
            call()  # warm-up: the split-K counters / accumulators are allocated (zeroed) once per device
            counter.launches.clear()
            with counter:
                y = call()
            assert len(counter.launches) == 1, (name, counter.launches)
            assert counter.ops == [], (name, counter.ops)  # no fill, copy or second kernel beside it
            assert y.shape == (m, n)
