"""The cpu backend's sparse_linear at batch M (prefill) against dense F.linear, per dtype x M x shape.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_sparse_batch.py                # every shape, M, dtype
    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_sparse_batch.py --shapes 2048x32000 --dtypes bf16 \\
        --batches 1 16 512 --reps 5

Each row times three calls, interleaved round by round so a shared machine's noise hits them
alike: F.linear on the row-major weight (the baseline), and sparse_linear at sparsity 0 (k = d,
the dense "fast head") and 0.5 on the column-major copy of the same weight (the layout
QSparseLinear stores). Printed: the median baseline time and the two ratios baseline / sparse
(> 1: sparse_linear is faster). Weights are one copy per layout: at batch M the product is
compute-bound, not a DRAM-bandwidth measurement (for that, see bench_cpu_sparse.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import _native
from qsparse_kernels.bench.harness import round_order

SHAPES = ("2048x2048", "2048x256", "2048x5632", "5632x2048", "2048x32000", "4096x11008")
BATCHES = (1, 2, 4, 8, 16, 64, 128, 512)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per function over ``reps`` rounds, each round calling every function once
    (in :func:`round_order`)."""
    samples = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name in round_order(fns, i):
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="in_features x out_features")
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {torch.get_num_threads()} threads, ISA {_native._C.cpu_isa()}, bf16 kernel {_native._C.cpu_bf16_gemm()};"
        f" median of {args.reps} interleaved rounds; ratio = F.linear time / sparse_linear time"
    )
    print(f"{'dtype':>5} {'shape':>10} {'M':>4} | {'F.linear ms':>11} | {'s=0':>6} {'s=0.5':>6}")
    gen = torch.Generator().manual_seed(0)
    for name in args.dtypes:
        dtype = DTYPES[name]
        for shape in args.shapes:
            d, n = (int(v) for v in shape.split("x"))
            w = torch.randn(n, d, generator=gen).to(dtype)
            wc = w.t().contiguous().t()
            for m in args.batches:
                x = torch.randn(m, d, generator=gen).to(dtype)
                fns = {
                    "dense": lambda x=x, w=w: F.linear(x, w),
                    "s0": lambda x=x, wc=wc, d=d: qk.sparse_linear(x, wc, d, backend="cpu"),
                    "s05": lambda x=x, wc=wc, d=d: qk.sparse_linear(x, wc, d // 2, backend="cpu"),
                }
                t = time_interleaved(fns, args.reps)
                print(
                    f"{name:>5} {shape:>10} {m:>4} | {t['dense'] * 1e3:11.3f} |"
                    f" {t['dense'] / t['s0']:5.2f}x {t['dense'] / t['s05']:5.2f}x",
                    flush=True,
                )
            w = wc = None


if __name__ == "__main__":
    main()
