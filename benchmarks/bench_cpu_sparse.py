"""The cpu backend's sparse_linear against dense F.linear, at DRAM bandwidth (SPEC "How speed is measured").

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_sparse.py            # batch 1, sparsity 0 / 0.5 / 0.9
    PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_sparse.py --batch    # also M in {1, 2, 4, 8, 16, 64}

Both sides use the same dtype and rotate over >= 128 MB of weight copies: sparse_linear reads the
column-major copies (``w.t().contiguous().t()``), F.linear the standard row-major ones. GB/s is
the kept weight bytes (k rows of ``out`` values) per second, printed beside the read bandwidth of
a large ``.sum()`` measured in the same run. Timings are median [p20, p80] of >= 20 calls.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels.bench.harness import copies_needed, read_bandwidth, time_calls

CPU = torch.device("cpu")


def _weights(out_f: int, in_f: int, dtype: torch.dtype):
    """Row-major and column-major copies, each rotation >= 128 MB."""
    n = copies_needed(out_f * in_f * torch.finfo(dtype).bits // 8, CPU)
    rows = [torch.randn(out_f, in_f).to(dtype) for _ in range(n)]
    cols = [w.t().contiguous().t() for w in rows]
    return rows, cols


def _fmt(t) -> str:
    return f"{t.p50 * 1e6:8.1f} [{t.p20 * 1e6:7.1f}, {t.p80 * 1e6:7.1f}]"


def run(shape, dtypes, sparsities, batches, reps: int) -> None:
    in_f, out_f = shape
    bw = read_bandwidth(CPU)
    print(f"# threads={torch.get_num_threads()}  measured read bandwidth (512 MB .sum()): {bw / 1e9:.1f} GB/s")
    print(f"# shape {in_f} -> {out_f}; times in us: median [p20, p80] of {reps} calls")
    hdr = f"{'dtype':>9} {'M':>3} {'sparsity':>8} {'k':>5} | {'dense F.linear':>27} | {'sparse_linear':>27} |"
    print(hdr + f" {'speedup':>7} | {'GB/s':>6} {'% of read bw':>12}")
    for dtype in dtypes:
        rows, cols = _weights(out_f, in_f, dtype)
        esize = torch.finfo(dtype).bits // 8
        for m in batches:
            x = torch.randn(m, in_f).to(dtype)
            dense = time_calls(lambda i, x=x, ws=rows: F.linear(x, ws[i]), len(rows), CPU, reps=reps)
            for s in sparsities:
                k = qk.sparsity_to_k(in_f, s)
                sp = time_calls(
                    lambda i, x=x, ws=cols, k=k: qk.sparse_linear(x, ws[i], k, backend="cpu"), len(cols), CPU, reps=reps
                )
                gbs = k * out_f * esize / sp.p50 / 1e9
                print(
                    f"{str(dtype)[6:]:>9} {m:>3} {s:>8.2f} {k:>5} | {_fmt(dense)} | {_fmt(sp)} |"
                    f" {dense.p50 / sp.p50:6.2f}x | {gbs:6.1f} {100 * gbs * 1e9 / bw:11.0f}%"
                )
        rows = cols = None  # free this dtype's copies before the next


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x11008", help="in_features x out_features")
    ap.add_argument("--batch", action="store_true", help="also sweep M in {1, 2, 4, 8, 16, 64} at sparsity 0.5")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    dtypes = (torch.float32, torch.bfloat16)
    run(shape, dtypes, (0.0, 0.5, 0.9), (1,), args.reps)
    if args.batch:
        print()
        run(shape, dtypes, (0.5,), (1, 2, 4, 8, 16, 64), args.reps)


if __name__ == "__main__":
    main()
