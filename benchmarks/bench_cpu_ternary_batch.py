"""Batched (prefill) CPU ternary_linear vs dense bf16 F.linear, interleaved in one process.

Usage:  PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_ternary_batch.py [--batches 2,4,8,16,64,128,512]
            [--shapes 2048x2048,2048x256,2048x5632,5632x2048,4096x11008] [--dtypes bfloat16] [--reps 7]
            [--isas amx,avx512] [--rotate-mb 450]

For every shape and batch M: the dense baseline is bf16 F.linear on a standard row-major
[out, in] weight; the ternary cases are qk.ternary_linear(backend="cpu") with dense activations
(k = None) and with Q-Sparse k = sparsity_to_k(d, 0.6125), for x in each --dtypes, on each ISA cap
in --isas ("amx": the AMX-INT8 kernel where the CPU has it, "avx512": AMX off, the AVX-512 VNNI
kernels that AMD Zen 4 runs). The cases rotate over distinct weight copies summing >= --rotate-mb
(default 450 MB, > 4x this machine's 105 MiB L3), so the weights come from DRAM: every ternary call
reads the packed copy after the one the previous ternary call read (one cycle for all the ternary
cases), so none finds its weight in the cache from another case of the same round. The cases run
interleaved (one call of each per round, --reps rounds after a warm-up round) and the table gives
median(dense) / median(case): > 1 means faster than dense.
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
from qsparse_kernels import reference as R
from qsparse_kernels.bench.harness import copies_needed, round_order

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bench_shape(d: int, out_f: int, batches: list[int], dtypes: list[str], isas: list[str], reps: int,
                total_mb: float) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, d, generator=g).to(torch.bfloat16)
    packed, scale = R.quantize_weight_ternary(w)
    total = int(total_mb * 2**20)
    ws = [w.clone() for _ in range(copies_needed(w.numel() * 2, "cpu", total))]
    ps = [packed.clone() for _ in range(copies_needed(packed.numel(), "cpu", total))]
    del w
    next_w, next_p = itertools.cycle(ws).__next__, itertools.cycle(ps).__next__
    k6 = qk.sparsity_to_k(d, 0.6125)
    rows = []
    for M in batches:
        xb = torch.randn(M, d, generator=g).to(torch.bfloat16)
        cases = [("dense", None, None, None)]
        for isa in isas:
            for dt in dtypes:
                for k in (None, k6):
                    cases.append((isa, DTYPES[dt], k, xb.to(DTYPES[dt])))
        times: list[list[float]] = [[] for _ in cases]
        for r in range(reps + 1):
            for c in round_order(range(len(cases)), r):
                isa, _, k, x = cases[c]
                if isa != "dense":
                    _native._C.set_cpu_isa_cap(isa)
                t0 = time.perf_counter()
                if isa == "dense":
                    F.linear(xb, next_w())
                else:
                    qk.ternary_linear(x, next_p(), scale, out_f, k, backend="cpu")
                dt = time.perf_counter() - t0
                if r > 0:
                    times[c].append(dt)
        _native._C.set_cpu_isa_cap("")
        base = statistics.median(times[0])
        for c, (isa, dtype, k, _) in enumerate(cases[1:], start=1):
            med = statistics.median(times[c])
            rows.append((f"{d}x{out_f}", M, isa, str(dtype).replace("torch.", ""), "None" if k is None else "s=0.6125",
                         base * 1e6, med * 1e6, base / med))
        print(f"  {d}x{out_f} M={M}: dense {base * 1e6:.0f} us; " +
              ", ".join(f"{r[2]}/{r[3]}/{r[4]} {r[7]:.2f}x" for r in rows if r[0] == f"{d}x{out_f}" and r[1] == M),
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="2048x2048,2048x256,2048x5632,5632x2048,4096x11008")
    ap.add_argument("--batches", default="2,4,8,16,64,128,512")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--isas", default="amx,avx512")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rotate-mb", type=float, default=450.0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(v) for v in args.batches.split(",")]
    isas = args.isas.split(",")
    print(f"{torch.get_num_threads()} threads; cpu_has_amx_int8={_native._C.cpu_has_amx_int8()}; "
          f"rotation > {args.rotate_mb:.0f} MB per case; {args.reps} interleaved rounds")
    rows = []
    for s in args.shapes.split(","):
        d, out_f = (int(v) for v in s.split("x"))
        rows += bench_shape(d, out_f, batches, args.dtypes.split(","), isas, args.reps, args.rotate_mb)
    print("\n| shape | M | isa | x dtype | k | dense us | ternary us | vs dense |")
    print("|---|---:|---|---|---|---:|---:|---:|")
    for shape, M, isa, dt, k, base, med, ratio in rows:
        print(f"| {shape} | {M} | {isa} | {dt} | {k} | {base:.0f} | {med:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
