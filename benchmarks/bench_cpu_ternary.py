"""CPU ternary_linear (backend="cpu") vs dense bf16 F.linear, same run (issue 3 targets).

Usage:  PYTHONPATH=. .venv/bin/python benchmarks/bench_cpu_ternary.py [--shape 4096x11008] [--batch 1]
            [--threads N] [--reps 30]

Both the bf16 baselines (standard row-major nn.Linear weights) and the packed ternary weights
rotate over >= 128 MB of copies so DRAM is measured; warm-up, median of >= 20 reps with p20/p80.
GB/s counts the weight bytes each call must read: out*in*2 for bf16, kept_rows * ceil(out/4) for
ternary (rows whose int8 activation is 0 are skipped too, so the bytes counted are those read).
The k=0 row reads no weight: it is the fixed cost (select + quantize + epilogue + threading).
Targets (issue 3): dense >= 10x, sparsity 0.6125 >= 18x faster than bf16 F.linear.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from qsparse_kernels.bench.harness import copies_needed, read_bandwidth, time_calls

TARGETS = {None: 10.0, 0.6125: 18.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x11008", help="in_features x out_features")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sparsities", default="none,0.5,0.6125", help="comma list; 'none' = k=None")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, out_f = (int(v) for v in args.shape.split("x"))
    M, dev = args.batch, torch.device("cpu")
    assert args.reps >= 20

    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, d, generator=g).to(torch.bfloat16)
    w = torch.randn(out_f, d, generator=g).to(torch.bfloat16)
    packed, scale = R.quantize_weight_ternary(w)
    n_bf16 = copies_needed(w.numel() * 2, dev)
    n_tern = copies_needed(packed.numel(), dev)
    ws = [w.clone() for _ in range(n_bf16)]
    ps = [packed.clone() for _ in range(n_tern)]
    del w

    bw = read_bandwidth(dev)
    print(f"shape {d}->{out_f}, batch {M}, {torch.get_num_threads()} threads, ISA {qk.backend_info()['cpu']['reason']}")
    print(f"rotation: bf16 {n_bf16} x {ws[0].numel() * 2 / 2**20:.1f} MiB, ternary {n_tern} x "
          f"{packed.numel() / 2**20:.2f} MiB; measured read bandwidth {bw / 1e9:.1f} GB/s")

    base = time_calls(lambda i: F.linear(x, ws[i]), n_bf16, dev, reps=args.reps)
    base_bytes = out_f * d * 2
    rows = [("bf16 F.linear", base, base_bytes)]

    cases: list[tuple[str, int | None, float | None]] = []
    for s in args.sparsities.split(","):
        if s.strip() == "none":
            cases.append(("ternary k=None", None, None))
        else:
            sp = float(s)
            cases.append((f"ternary s={sp:g}", qk.sparsity_to_k(d, sp), sp))
    cases.append(("ternary k=0 (fixed cost)", 0, None))

    cols = packed.shape[1]
    for name, k, _ in cases:
        xs = x.float() if k is None else R.topk_sparsify(x.float(), k)
        x_q, _ = R.quantize_act_int8(xs)
        read_rows = int((x_q != 0).any(0).sum())  # the union of the rows' nonzero activations
        t = time_calls(lambda i, k=k: qk.ternary_linear(x, ps[i], scale, out_f, k, backend="cpu"), n_tern, dev,
                       reps=args.reps)
        rows.append((name + ("" if k is None else f" (k={k})"), t, read_rows * cols))

    print(f"\n{'case':34s} {'p50 us':>9s} {'p20 us':>9s} {'p80 us':>9s} {'vs bf16':>8s} {'GB/s':>7s} {'% bw':>5s}")
    for name, t, nbytes in rows:
        gbs = nbytes / t.p50 / 1e9
        print(f"{name:34s} {t.p50 * 1e6:9.1f} {t.p20 * 1e6:9.1f} {t.p80 * 1e6:9.1f} {base.p50 / t.p50:7.2f}x "
              f"{gbs:7.1f} {100 * gbs * 1e9 / bw:4.0f}%")
    for (name, k, sp), (_, t, _) in zip(cases, rows[1:], strict=True):
        key = None if k is None else sp
        if (k is None or sp is not None) and key in TARGETS:
            got = base.p50 / t.p50
            print(f"target {name}: >= {TARGETS[key]:g}x, got {got:.2f}x: {'met' if got >= TARGETS[key] else 'MISSED'}")
    print(f"ideal bytes ratio bf16/ternary (dense): {base_bytes / (d * cols):.2f}x; "
          f"at s=0.6125: {base_bytes / (math.ceil((1 - 0.6125) * d) * cols):.2f}x")


if __name__ == "__main__":
    main()
