"""The cpu backend's sparse_linear against dense F.linear, at DRAM bandwidth (SPEC "How speed is measured").

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_sparse.py               # batch 1, sparsity 0 / 0.5 / 0.9
    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_sparse.py --batch       # + M in {1, 2, 4, 8, 16, 64}
    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_sparse.py --threads 1   # torch.set_num_threads(1)

Both sides use the same dtype and rotate over >= 128 MB of weight copies: sparse_linear reads the
column-major copies (``w.t().contiguous().t()``), F.linear the standard row-major ones; the
activations rotate too, so the kept rows differ from call to call. Every sparse call reads the
column-major copy after the one the previous sparse call read (one cycle shared by the sparsities),
so no call finds its weight in the cache from another call of the same round. The calls of one row of the
table (dense, sparse, and a 256 MB ``.sum()`` for the read bandwidth) are interleaved, so a
shared machine's noise hits all of them alike; the ratios are the numbers to quote. GB/s is the
kept weight bytes (k rows of ``out`` values) per second of the median sparse call.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels.bench.harness import Timing, copies_needed, round_order

CPU = torch.device("cpu")
N_X = 7  # activation variants


def _q(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def time_interleaved(fns: dict, reps: int, warmup: int = 3, clock=time.perf_counter) -> dict[str, Timing]:
    """Calls every ``fn(i)`` once per round (in :func:`round_order`), ``warmup + reps`` rounds;
    per-function median, p20, p80."""
    samples = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name in round_order(fns, i):
            fn = fns[name]
            t0 = clock()
            fn(i)
            if i >= warmup:
                samples[name].append(clock() - t0)
    return {n: Timing(statistics.median(s), _q(s, 0.2), _q(s, 0.8)) for n, s in samples.items()}


def _fmt(t: Timing) -> str:
    return f"{t.p50 * 1e6:8.0f} [{t.p20 * 1e6:6.0f}, {t.p80 * 1e6:6.0f}]"


def run(shape, dtypes, sparsities, batches, reps: int, clock) -> None:
    in_f, out_f = shape
    big = torch.ones((256 << 20) // 4)  # the read-bandwidth probe, >> last-level cache
    print(f"# shape {in_f} -> {out_f}, {torch.get_num_threads()} threads; times in us: median [p20, p80] of {reps}")
    print(
        f"{'dtype':>8} {'M':>3} {'spars':>5} {'k':>5} | {'dense F.linear':>23} | {'sparse_linear':>23} |"
        f" {'speedup':>7} | {'GB/s':>5} {'read GB/s':>9} {'%':>4}"
    )
    for dtype in dtypes:
        esize = torch.finfo(dtype).bits // 8
        n = copies_needed(out_f * in_f * esize, CPU)
        rows = [torch.randn(out_f, in_f).to(dtype) for _ in range(n)]
        cols = [w.t().contiguous().t() for w in rows]
        # One cycle per layout, running on across M and sparsities (see the docstring).
        row, col = itertools.cycle(rows).__next__, itertools.cycle(cols).__next__
        for m in batches:
            xs = [torch.randn(m, in_f).to(dtype) for _ in range(N_X)]
            fns = {
                "sum": lambda i: big.sum(),
                "dense": lambda i, xs=xs, w=row: F.linear(xs[i % N_X], w()),
            }
            ks = [qk.sparsity_to_k(in_f, s) for s in sparsities]
            for k in ks:
                fns[k] = lambda i, xs=xs, k=k, w=col: qk.sparse_linear(xs[i % N_X], w(), k, backend="cpu")
            t = time_interleaved(fns, reps, clock=clock)
            bw = big.numel() * 4 / t["sum"].p50 / 1e9
            for s, k in zip(sparsities, ks, strict=True):
                gbs = k * out_f * esize / t[k].p50 / 1e9
                print(
                    f"{str(dtype)[6:]:>8} {m:>3} {s:>5.2f} {k:>5} | {_fmt(t['dense'])} | {_fmt(t[k])} |"
                    f" {t['dense'].p50 / t[k].p50:6.2f}x | {gbs:5.1f} {bw:9.1f} {100 * gbs / bw:3.0f}%"
                )
        rows = cols = row = col = fns = None  # free this dtype's copies before the next


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x11008", help="in_features x out_features")
    ap.add_argument("--batch", action="store_true", help="also sweep M in {1, 2, 4, 8, 16, 64} at sparsity 0.5")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the thread's CPU clock (only with --threads 1): robust to other processes on the machine",
    )
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and torch.get_num_threads() != 1:
        ap.error("--cpu-time needs --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    shape = tuple(int(v) for v in args.shape.split("x"))
    dtypes = (torch.float32, torch.bfloat16)
    run(shape, dtypes, (0.0, 0.5, 0.9), (1,), args.reps, clock)
    if args.batch:
        print()
        run(shape, dtypes, (0.5,), (1, 2, 4, 8, 16, 64), args.reps, clock)


if __name__ == "__main__":
    main()
