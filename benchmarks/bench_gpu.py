"""GPU benchmark of the ``triton`` and ``cuda`` backends at the decode shape 4096 -> 14336, bf16, batch 1.

Prints one table and, when ``$OUT`` is set, writes ``$OUT/bench_gpu.csv`` (long format, one row
per case and timing mode). Method (SPEC "How speed is measured"):

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

Targets (reported, not enforced): sparse 0.5 >= 1.8x, ternary >= 6x, ternary 0.6125 >= 10x,
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

ROTATE_BYTES = 256 * 2**20
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-features", type=int, default=4096)
    ap.add_argument("--out-features", type=int, default=14336)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--backends", nargs="*", default=["triton", "cuda"], help="GPU backends, side by side")
    args = ap.parse_args(argv)
    assert args.reps >= 20, "median of >= 20 repetitions"
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    d, n, m, dtype = args.in_features, args.out_features, args.batch, torch.bfloat16
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

    x = torch.randn(m, d, device=dev, dtype=dtype)
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

    cases: list[tuple[str, str, float, int, Callable[[tuple], Callable[[], object]], list[tuple]]] = []
    cases.append(("F.linear (cuBLAS)", "torch", 0.0, dense_bytes, lambda w: (lambda: F.linear(x, w[0])), dense_w))
    k_t = qk.sparsity_to_k(d, 0.6125)
    for be in backends:
        for s in (0.5, 0.9):
            k = qk.sparsity_to_k(d, s)
            cases.append((
                "sparse_linear", be, s, k * n * 2,
                lambda w, k=k, be=be: (lambda: qk.sparse_linear(x, w[0], k, backend=be)), col_w,
            ))  # fmt: skip
        cases.append((
            "ternary_linear", be, 0.0, packed_bytes,
            lambda w, be=be: (lambda: qk.ternary_linear(x, w[0], w[1], n, None, backend=be)), tern_w,
        ))  # fmt: skip
        cases.append((
            "ternary_linear", be, 0.6125, k_t * ((n + 3) // 4),
            lambda w, be=be: (lambda: qk.ternary_linear(x, w[0], w[1], n, k_t, backend=be)), tern_w,
        ))  # fmt: skip
        # The selection alone (no weights): its share of a decode step.
        cases.append((
            "topk_sparsify", be, 0.5, 0, lambda w, be=be: (lambda: qk.topk_sparsify(x, d // 2, backend=be)), [()]
        ))  # fmt: skip

        # Correctness spot check at the benchmark shape before timing anything.
        ref = qk.sparse_linear(x, dense_w[0][0], d // 2, backend="reference")
        got = qk.sparse_linear(x, dense_w[0][0].t().contiguous().t(), d // 2, backend=be)
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"spot check sparse_linear[{be}] vs reference: rel err {err:.2e}")

    rows = []
    base: dict[str, float] = {}
    for name, be, s, nbytes, make_fn, ws in cases:
        for mode in ("graph", "eager"):
            fns = [make_fn(w) for w in ws]
            if mode == "graph":
                for f in fns:  # compile + autotune outside the capture
                    f()
                fns = [graphed(f) for f in fns]
            ts = time_events(fns, args.reps, args.warmup)
            p50, p20, p80 = quantiles(ts)
            if name.startswith("F.linear"):
                base[mode] = p50
            gbps = nbytes / (p50 * 1e-3) / 1e9 if nbytes else float("nan")
            rows.append({
                "kernel": name, "backend": be, "mode": mode, "sparsity": s, "in_features": d, "out_features": n, "M": m,
                "dtype": "bf16", "p50_us": p50 * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3,
                "speedup_vs_F.linear": base[mode] / p50 if nbytes else float("nan"), "weight_GBps": gbps,
                "frac_of_copy_bw": gbps / copy_gbps if nbytes else float("nan"),
                "copy_GBps": copy_gbps, "device": gpu, "torch": torch.__version__, "triton": triton.__version__,
            })  # fmt: skip
            del fns
            torch.cuda.empty_cache()

    targets = {("sparse_linear", 0.5): 1.8, ("ternary_linear", 0.0): 6.0, ("ternary_linear", 0.6125): 10.0}
    hdr = (
        f"{'kernel':<18} {'backend':<8} {'mode':<6} {'s':>7} {'p50 us':>9} {'p20 us':>9} {'p80 us':>9} {'x F.lin':>8} "
        f"{'GB/s':>7} {'%copy':>6}  target"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        t = targets.get((r["kernel"], r["sparsity"]))
        note = ""
        if t is not None:
            note = f">= {t:g}x: {'met' if r['speedup_vs_F.linear'] >= t else 'MISSED'}"
        if r["kernel"] == "sparse_linear":
            ok = r["frac_of_copy_bw"] >= 0.8
            note += f"{'; ' if note else ''}>= 80% copy bw: {'met' if ok else 'MISSED'}"
        print(
            f"{r['kernel']:<18} {r['backend']:<8} {r['mode']:<6} {r['sparsity']:>7.4g} {r['p50_us']:>9.1f} "
            f"{r['p20_us']:>9.1f} {r['p80_us']:>9.1f} {r['speedup_vs_F.linear']:>8.2f} {r['weight_GBps']:>7.0f} "
            f"{100 * r['frac_of_copy_bw']:>5.0f}%  {note}"
        )
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = os.path.join(out_dir, "bench_gpu.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
