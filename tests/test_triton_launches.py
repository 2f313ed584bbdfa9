"""One launch per call: ``ternary_linear`` at M <= 16 and ``sparse_linear`` up to its batch crossover
launch exactly one kernel (selection, quantization, GEMV and split-K reduction fused), and no other
tensor work runs on the device beside it (no fill, no copy). Counted by wrapping the launch method
of Triton's kernel objects (natively ``JITFunction.run``, under ``TRITON_INTERPRET=1`` the
interpreter's) in a profiler range, and by torch.profiler, which records every ATen op, inside
custom ops too; those outside the launches, except allocations and views, must not be there.

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
    import qsparse_kernels as qk
    from qsparse_kernels import reference as R
    from qsparse_kernels.triton.sparse_gemv import SPARSE_MAX_BATCH, _sparse_gemv_kernel
    from qsparse_kernels.triton.ternary_gemv import _ternary_gemv_kernel

    DEVICE = "cpu" if INTERPRET else "cuda"
    LAUNCH = "qsk_triton_launch"  # the profiler range around every kernel launch
    # ATen ops that launch nothing: allocation, metadata, views.
    NO_LAUNCH = {"empty", "empty_strided", "view", "reshape", "_unsafe_view", "as_strided", "t", "transpose",
                 "expand", "slice", "select", "unsqueeze", "squeeze", "detach", "alias", "lift_fresh",
                 "contiguous", "empty_like"}

    class _Count:
        """Records, while active, every kernel launch and every ATen op outside the launches.

        torch.profiler sees the ops inside custom ops too (a TorchDispatchMode does not: it is
        switched off while it handles the custom op, so work done inside it went unseen)."""

        def __init__(self):
            self.launches: list[str] = []
            self.ops: list[str] = []

        def __enter__(self):
            self.launches.clear()
            self.ops.clear()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
            return self

        def __exit__(self, *exc):
            self.prof.__exit__(*exc)
            for e in self.prof.events():
                if not e.name.startswith("aten::"):
                    continue
                name, parent, inside = e.name[len("aten::"):], e.cpu_parent, False
                while parent is not None and not inside:
                    inside, parent = parent.name == LAUNCH, parent.cpu_parent
                # (The argument checks read a CPU scale with .item(): host work, no launch.)
                host = name in ("item", "_local_scalar_dense") and INTERPRET
                if not inside and name not in NO_LAUNCH and not host:
                    self.ops.append(name)

    @pytest.fixture
    def counter(monkeypatch):
        mode = _Count()
        for cls in {type(_sparse_gemv_kernel), type(_ternary_gemv_kernel)}:
            orig = cls.run

            def run(self, *a, _orig=orig, **kw):
                mode.launches.append(getattr(self, "__name__", "?"))
                with torch.profiler.record_function(LAUNCH):  # the interpreter's own host copies are not launches
                    return _orig(self, *a, **kw)

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
        if k is not None and m <= SPARSE_MAX_BATCH:  # larger batches: the next test
            calls.append(("sparse_linear", lambda: qk.sparse_linear(x, w, k, b, backend="triton")))
        calls.append(("ternary_linear", lambda: qk.ternary_linear(x, packed, scale, n, k, b, backend="triton")))
        for name, call in calls:
            call()  # warm-up: the split-K counters / accumulators are allocated (zeroed) once per device
            with counter:
                y = call()
            assert len(counter.launches) == 1, (name, counter.launches)
            assert counter.ops == [], (name, counter.ops)  # no fill, copy or second kernel beside it
            assert y.shape == (m, n)

    def test_batch_above_the_crossover_selects_then_matmul(counter, gen):
        """Above ``SPARSE_MAX_BATCH`` rows ``sparse_linear`` is the selection kernel, then ``F.linear``
        (cuBLAS on a GPU): one launch, and the matmul is seen (the counter sees inside the op)."""
        m, d, n, k = SPARSE_MAX_BATCH + 1, 200, 70, 100
        x = torch.randn(m, d, generator=gen).to(DEVICE)
        w = torch.randn(n, d, generator=gen).t().contiguous().t().to(DEVICE)
        qk.sparse_linear(x, w, k, backend="triton")
        with counter:
            y = qk.sparse_linear(x, w, k, backend="triton")
        assert len(counter.launches) == 1, counter.launches
        assert {"mm", "addmm", "linear", "matmul"} & set(counter.ops), counter.ops
        torch.testing.assert_close(y, torch.nn.functional.linear(R.topk_sparsify(x, k), w))
