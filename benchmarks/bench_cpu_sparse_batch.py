"""The cpu backend's sparse_linear at batch M (prefill) against dense F.linear, per dtype x M x shape.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_sparse_batch.py                # every shape, M, dtype
    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_sparse_batch.py --shapes 2048x32000 --dtypes bf16 \\
        --batches 1 16 512 --reps 5

Each row times three calls, interleaved round by round (in :func:`round_order`) so a shared
machine's noise hits them alike: F.linear on the row-major weight (the baseline), and
sparse_linear at sparsity 0 (k = d, the dense "fast head") and 0.5 on the column-major copy of
the same weight (the layout QSparseLinear stores). Printed: the median baseline time and, per
variant, the median over rounds of the per-round ratio baseline / sparse with its min and max
(> 1: sparse_linear is faster).

Weights come from DRAM by default, as in a model's forward: every variant rotates over distinct
copies of its weight that sum to at least ``--rotate-mb`` (default: the harness's
:func:`dram_bytes`, >= 4x the LLC and >= 1 GiB). ``--rotate-mb 0`` keeps one copy per layout,
so the weight sits in the last-level cache (the stop 25 / 26 tables in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import _native
from qsparse_kernels.bench.harness import copies_needed, dram_bytes, round_order

SHAPES = ("2048x2048", "2048x256", "2048x5632", "5632x2048", "2048x32000", "4096x11008")
BATCHES = (1, 2, 4, 8, 16, 64, 128, 512)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_rounds(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every function in each of ``reps`` rounds (after ``warmup`` rounds);
    each round calls every function once, in :func:`round_order`."""
    samples = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name in round_order(fns, i):
            t0 = time.perf_counter()
            fns[name]()
            if i >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return samples


def ratio_cell(base: list[float], case: list[float]) -> str:
    """The median of the per-round ratios base / case, with their min and max."""
    r = [b / c for b, c in zip(base, case, strict=True)]
    return f"{statistics.median(r):5.2f} [{min(r):.2f}, {max(r):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="in_features x out_features")
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rotate-mb", type=float, default=None,
                    help="MB of weight copies each variant rotates over (default: >= 4x LLC and >= 1 GiB; "
                         "0: one copy, LLC-resident)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rotate = dram_bytes("cpu") if args.rotate_mb is None else int(args.rotate_mb * 2**20)
    where = "LLC-resident (one copy)" if rotate <= 0 else f"DRAM (rotation >= {rotate / 2**20:.0f} MB per variant)"
    print(
        f"# {torch.get_num_threads()} threads, ISA {_native._C.cpu_isa()}, bf16 kernel {_native._C.cpu_bf16_gemm()};"
        f" weights {where}; {args.reps} interleaved rounds;"
        f" ratio = F.linear time / sparse_linear time per round, median [min, max]"
    )
    print(f"{'dtype':>5} {'shape':>10} {'M':>4} | {'F.linear ms':>11} | {'s=0':>19} | {'s=0.5':>19}")
    gen = torch.Generator().manual_seed(0)
    for name in args.dtypes:
        dtype = DTYPES[name]
        for shape in args.shapes:
            d, n = (int(v) for v in shape.split("x"))
            w = torch.randn(n, d, generator=gen).to(dtype)
            copies = 1 if rotate <= 0 else copies_needed(w.numel() * w.element_size(), "cpu", rotate)
            ws = [w] + [w.clone() for _ in range(copies - 1)]
            wcs = [v.t().contiguous().t() for v in ws]
            del w
            # One cycle per layout, running on across M: each call reads the copy after the one the
            # previous call on that layout read (s0 and s05 share the column-major copies).
            row, col = itertools.cycle(ws).__next__, itertools.cycle(wcs).__next__
            for m in args.batches:
                x = torch.randn(m, d, generator=gen).to(dtype)
                fns = {
                    "dense": lambda x=x, w=row: F.linear(x, w()),
                    "s0": lambda x=x, w=col, d=d: qk.sparse_linear(x, w(), d, backend="cpu"),
                    "s05": lambda x=x, w=col, d=d: qk.sparse_linear(x, w(), d // 2, backend="cpu"),
                }
                t = time_rounds(fns, args.reps)
                print(
                    f"{name:>5} {shape:>10} {m:>4} | {statistics.median(t['dense']) * 1e3:11.3f} |"
                    f" {ratio_cell(t['dense'], t['s0'])} | {ratio_cell(t['dense'], t['s05'])}",
                    flush=True,
                )
            ws = wcs = row = col = fns = None  # free this shape's copies before the next


if __name__ == "__main__":
    main()
