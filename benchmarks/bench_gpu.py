"""GPU benchmark of the ``triton`` and ``cuda`` backends at the decode shape 4096 -> 14336, bf16, M = 1, 4, 16.

The public ops are timed as users call them (above the backend's batch crossover ``sparse_linear``
is select + cuBLAS); the ``sparse fused`` rows time the fused sparse GEMV itself at M > 1, which is
what places that crossover.

Prints each row as it is measured and, when ``$OUT`` is set, appends it to ``$OUT/bench_gpu.csv``
at once (long format, one row per case, batch and timing mode), so a run cut short by its time
limit keeps every row it measured; at the end ``$OUT/gpu_roofline.md`` is the roofline table of
``benchmarks/gpu_roofline.py`` with its measured columns filled in. A parity spot check of every
backend at the benchmark shape runs before any timing and exits with status 3, loudly, when it
fails. Method (SPEC "How speed is measured"):

* baseline ``F.linear`` (cuBLAS) with the standard row-major ``nn.Linear`` weight, same dtype, same
  process run; every ratio is ``t(F.linear) / t(op)`` measured the same way;
* weights rotate over copies totalling >= 256 MB per case, so HBM is measured, not L2;
* CUDA-event timing, warm-up first (it also fills the autotune cache), median of ``--reps``
  (>= 20) with p20/p80;
* two timing modes: ``graph`` replays a CUDA graph of one call (the kernels' own time, as a decode
  step captured in a graph runs), ``eager`` calls the public op from Python (adds dispatch and
  launch overhead, which matters at these microsecond scales);
* achieved GB/s = bytes of weights the op actually reads / time, beside the copy bandwidth of a
  1 GB tensor (``dst.copy_(src)``: bytes read + bytes written / time) measured in the same run.

Targets (reported, not enforced; issue 18): sparse 0.5 >= 1.8x, ternary >= 5x, ternary 0.6125 >= 7x,
sparse at >= 80% of copy bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import qsparse_kernels as qk  # noqa: E402
from benchmarks import gpu_roofline  # noqa: E402

ROTATE_BYTES = 256 * 2**20


def _fused_triton(x, w, k):
    from qsparse_kernels.triton.sparse_gemv import sparse_linear_rows

    return sparse_linear_rows(x, w, k, None)


# The fused sparse GEMV of each backend called directly, at any M (the public op takes select +
# cuBLAS above the backend's batch crossover): the "sparse fused" rows, which place that crossover.
FUSED_SPARSE = {
    "cuda": lambda x, w, k: torch.ops.qsparse.sparse_linear_kernel(x, w, k, None),
    "triton": _fused_triton,
}
COPY_BYTES = 2**30


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    """``(p50, p20, p80)`` of ``ts``."""
    s = sorted(ts)
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(s), q[1], q[7]


def time_events(fns: list[Callable[[], object]], reps: int, warmup: int) -> list[float]:
    """Milliseconds per call; call ``r`` runs ``fns[r % len(fns)]`` (the rotation of weight copies)."""
    for r in range(warmup):
        fns[r % len(fns)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        fns[r % len(fns)]()
        ends[r].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """A CUDA graph of one call of ``fn`` (warmed up on a side stream first, as PyTorch requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth(reps: int) -> float:
    """GB/s of ``dst.copy_(src)`` on a 1 GB tensor, counting the bytes read and written."""
    buf = torch.empty(2, COPY_BYTES, dtype=torch.uint8, device="cuda")
    buf[0].random_(0, 255)
    ms = statistics.median(time_events([lambda: buf[1].copy_(buf[0])], reps, warmup=3))
    buf = None
    torch.cuda.empty_cache()
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def copies(make: Callable[[], tuple], nbytes: int) -> list[tuple]:
    """Enough independent copies of a weight (``make()`` -> tensors) to total >= 256 MB."""
    n = max(2, math.ceil(ROTATE_BYTES / max(nbytes, 1)))
    return [make() for _ in range(n)]


TARGETS = {("sparse_linear", 0.5): 1.8, ("ternary_linear", 0.0): 5.0, ("ternary_linear", 0.6125): 7.0}
HEADER = (
    f"{'kernel':<18} {'backend':<8} {'mode':<6} {'M':>3} {'s':>7} {'p50 us':>9} {'p20 us':>9} {'p80 us':>9} "
    f"{'x F.lin':>8} {'GB/s':>7} {'%copy':>6}  target"
)


def format_row(r: dict) -> str:
    """One printed line of the table (with the target verdict where there is one)."""
    t = TARGETS.get((r["kernel"], r["sparsity"]))
    note = ""
    if t is not None:
        note = f">= {t:g}x: {'met' if r['speedup_vs_F.linear'] >= t else 'MISSED'}"
    if r["kernel"] == "sparse_linear":
        ok = r["frac_of_copy_bw"] >= 0.8
        note += f"{'; ' if note else ''}>= 80% copy bw: {'met' if ok else 'MISSED'}"
    return (
        f"{r['kernel']:<18} {r['backend']:<8} {r['mode']:<6} {r['M']:>3} {r['sparsity']:>7.4g} {r['p50_us']:>9.1f} "
        f"{r['p20_us']:>9.1f} {r['p80_us']:>9.1f} {r['speedup_vs_F.linear']:>8.2f} {r['weight_GBps']:>7.0f} "
        f"{100 * r['frac_of_copy_bw']:>5.0f}%  {note}"
    )


class RowSink:
    """Prints each row as it comes and appends it to ``csv_path`` (header first), flushed at once."""

    def __init__(self, csv_path: str | None, out=sys.stdout):
        self.csv_path, self.out, self.rows = csv_path, out, []
        print(HEADER, file=out, flush=True)
        print("-" * len(HEADER), file=out, flush=True)
        if csv_path and os.path.exists(csv_path):
            os.remove(csv_path)

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        print(format_row(row), file=self.out, flush=True)
        if self.csv_path:
            new = not os.path.exists(self.csv_path)
            with open(self.csv_path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)


def measure(cases, reps: int, warmup: int, copy_gbps: float, meta: dict, sink: Callable[[dict], None],
            timer=None, graph=None, cleanup=None) -> None:
    """Times every case in both modes and hands each row to ``sink`` as soon as it is measured.

    ``cases``: ``(name, backend, sparsity, M, weight bytes, make_fn, weights)``; the baseline
    (``F.linear``) of each M comes first. ``timer(fns, reps, warmup) -> [ms]``, ``graph(fn) -> fn``
    and ``cleanup()`` default to CUDA events, CUDA graphs and ``torch.cuda.empty_cache`` (tests pass
    fakes).
    """
    timer = timer or time_events
    graph = graph or graphed
    cleanup = cleanup or torch.cuda.empty_cache
    base: dict[tuple[str, int], float] = {}
    for name, be, s, m, nbytes, make_fn, ws in cases:
        for mode in ("graph", "eager"):
            fns = [make_fn(w) for w in ws]
            if mode == "graph":
                for f in fns:  # compile + autotune outside the capture
                    f()
                fns = [graph(f) for f in fns]
            p50, p20, p80 = quantiles(timer(fns, reps, warmup))
            if name.startswith("F.linear"):
                base[mode, m] = p50
            gbps = nbytes / (p50 * 1e-3) / 1e9 if nbytes else float("nan")
            sink({
                "kernel": name, "backend": be, "mode": mode, "sparsity": s, "M": m, **meta,
                "p50_us": p50 * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3,
                "speedup_vs_F.linear": base[mode, m] / p50 if nbytes else float("nan"), "weight_GBps": gbps,
                "frac_of_copy_bw": gbps / copy_gbps if nbytes else float("nan"), "copy_GBps": copy_gbps,
            })  # fmt: skip
            del fns
            cleanup()


def spot_check(x, dense_w, tern, n: int, k: int, be: str) -> list[str]:
    """Parity of ``be`` at the benchmark shape: sparse_linear within twice plain bf16 PyTorch's error
    (vs float64), ternary_linear bit-exact with the reference. Returns the failures."""
    bad = []
    w = dense_w[0][0]
    xs = qk.topk_sparsify(x, k, backend="reference")
    ref64 = F.linear(xs.double(), w.double())
    rel = lambda y: ((y.double() - ref64).norm() / ref64.norm()).item()  # noqa: E731
    err, plain = rel(qk.sparse_linear(x, w.t().contiguous().t(), k, backend=be)), rel(F.linear(xs, w))
    print(f"spot check sparse_linear[{be}] M={x.shape[0]}: rel err {err:.2e} (plain bf16 {plain:.2e})", flush=True)
    if not err <= 2 * plain + 1e-3:
        bad.append(f"sparse_linear[{be}] rel err {err:.2e} > 2 x {plain:.2e} + 1e-3")
    packed, scale = tern[0]
    for kt in (None, k):
        got = qk.ternary_linear(x, packed, scale, n, kt, backend=be)
        want = qk.ternary_linear(x, packed, scale, n, kt, backend="reference")
        ok = torch.equal(got, want)
        print(f"spot check ternary_linear[{be}] M={x.shape[0]} k={kt}: {'exact' if ok else 'DIFFERS'}", flush=True)
        if not ok:
            bad.append(f"ternary_linear[{be}] k={kt} differs from the reference")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-features", type=int, default=4096)
    ap.add_argument("--out-features", type=int, default=14336)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="decode batch sizes M")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--backends", nargs="*", default=["triton", "cuda"], help="GPU backends, side by side")
    args = ap.parse_args(argv)
    assert args.reps >= 20, "median of >= 20 repetitions"
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    d, n, dtype = args.in_features, args.out_features, torch.bfloat16
    dev = "cuda"
    gpu = torch.cuda.get_device_name()
    import triton

    env = f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, {gpu}"
    print(f"bench_gpu: {env}")
    info = qk.backend_info()
    for b in args.backends:
        print(f"{b} backend: {info[b]['reason']}")
    backends = [b for b in args.backends if info[b]["usable"]]

    copy_gbps = copy_bandwidth(args.reps)
    print(f"copy bandwidth (1 GB, read + write): {copy_gbps:.0f} GB/s")

    dense_bytes = n * d * 2
    # Baseline: row-major nn.Linear weights.
    def make_dense():
        return ((torch.randn(n, d, device=dev) / math.sqrt(d)).to(dtype),)

    dense_w = copies(make_dense, dense_bytes)
    # The sparse kernel's fast layout: a logical [n, d] weight stored column-major (stride(0) == 1).
    col_w = copies(lambda: (make_dense()[0].t().contiguous().t(),), dense_bytes)
    assert col_w[0][0].stride(0) == 1
    packed_bytes = d * ((n + 3) // 4)

    def make_ternary():
        w = torch.randn(n, d, device=dev, dtype=torch.float32)
        packed, scale = qk.quantize_weight_ternary(w, backend="reference")
        return packed, scale

    tern_w = copies(make_ternary, packed_bytes)

    # Correctness spot check at the benchmark shape, every backend and batch, before timing anything.
    failures = []
    for m in args.batch:
        xm = torch.randn(m, d, device=dev, dtype=dtype)
        for be in backends:
            failures += spot_check(xm, dense_w, tern_w, n, d // 2, be)
    if failures:
        print("bench_gpu: PARITY SPOT CHECK FAILED, no timings taken:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 3

    k_t = qk.sparsity_to_k(d, 0.6125)
    cases = []
    for m in args.batch:
        x = torch.randn(m, d, device=dev, dtype=dtype)
        cases.append(("F.linear (cuBLAS)", "torch", 0.0, m, dense_bytes,
                      lambda w, x=x: (lambda: F.linear(x, w[0])), dense_w))  # fmt: skip
        for be in backends:
            for s in (0.5, 0.9):
                k = qk.sparsity_to_k(d, s)
                kept = gpu_roofline.kept_rows(d, s, m)
                cases.append((
                    "sparse_linear", be, s, m, int(kept * n * 2),
                    lambda w, k=k, be=be, x=x: (lambda: qk.sparse_linear(x, w[0], k, backend=be)), col_w,
                ))  # fmt: skip
            cases.append((
                "ternary_linear", be, 0.0, m, packed_bytes,
                lambda w, be=be, x=x: (lambda: qk.ternary_linear(x, w[0], w[1], n, None, backend=be)), tern_w,
            ))  # fmt: skip
            kept = gpu_roofline.kept_rows(d, 0.6125, m)
            cases.append((
                "ternary_linear", be, 0.6125, m, int(kept * ((n + 3) // 4)),
                lambda w, be=be, x=x: (lambda: qk.ternary_linear(x, w[0], w[1], n, k_t, backend=be)), tern_w,
            ))  # fmt: skip
            if m > 1:  # the fused GEMV itself, past the public op's batch crossover: where should it be?
                kept = gpu_roofline.kept_rows(d, 0.5, m)
                cases.append((
                    "sparse fused", be, 0.5, m, int(kept * n * 2),
                    lambda w, be=be, x=x: (lambda: FUSED_SPARSE[be](x, w[0], d // 2)), col_w,
                ))  # fmt: skip
            # The selection alone (no weights): its share of a decode step.
            cases.append((
                "topk_sparsify", be, 0.5, m, 0,
                lambda w, be=be, x=x: (lambda: qk.topk_sparsify(x, d // 2, backend=be)), [()],
            ))  # fmt: skip

    out_dir = os.environ.get("OUT")
    sink = RowSink(os.path.join(out_dir, "bench_gpu.csv") if out_dir else None)
    meta = {"in_features": d, "out_features": n, "dtype": "bf16", "device": gpu, "torch": torch.__version__,
            "triton": triton.__version__}  # fmt: skip
    measure(cases, args.reps, args.warmup, copy_gbps, meta, sink)
    if out_dir:
        path = os.path.join(out_dir, "gpu_roofline.md")
        with open(path, "w") as f:
            f.write(gpu_roofline.render(gpu_roofline.fill(gpu_roofline.rows(), sink.rows)))
        print(f"wrote {os.path.join(out_dir, 'bench_gpu.csv')} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
