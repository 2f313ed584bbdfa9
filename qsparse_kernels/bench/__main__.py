"""``python -m qsparse_kernels.bench``: Q-Sparse kernels vs dense ``F.linear`` on this machine.

Every usable backend with a native kernel for the op, the SPEC headline shapes, ratios against
dense ``F.linear`` (row-major ``nn.Linear`` weight, same dtype) measured in the same run, rotating
weights, median with p20/p80, achieved GB/s beside the read bandwidth measured in the same run.
The default is a quick run (batch 1, bf16); ``--full`` sweeps batch, sparsity and dtype.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from .. import __version__, ops
from ..backends import backend_info
from ..backends import ops as backend_ops
from . import cases
from .harness import dram_bytes, machine_summary, read_bandwidth, time_calls


@dataclass
class Row:
    kernel: str
    backend: str
    shape: str
    in_features: int
    out_features: int
    M: int
    sparsity: float
    k: int
    dtype: str
    p50_us: float
    p20_us: float
    p80_us: float
    gbps: float
    bw_frac: float
    speedup: float
    spread: float  # p80 / p20
    attempts: int  # measurements taken (a wide spread is measured again)
    wide: bool  # p80 / p20 > harness.WIDE_SPREAD even after the repeats
    residency: str  # "dram" (rotation), "dram-flushed" (rotation + weights flushed per call), "cache-resident"
    device: str
    isa: str
    threads: int
    llc_mib: float
    version: str
    git_sha: str


def _git_sha() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _backends_for(op: str, device: torch.device, wanted: list[str] | None) -> list[str]:
    info = backend_info()
    from ..backends import devices

    names = wanted or [n for n in info if n != "reference"]
    out = []
    for n in names:
        usable = info[n]["usable"] and device.type in devices(n)
        native = op in backend_ops(n)
        if usable and (native or wanted):
            out.append(n)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qsparse_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="sweep every batch size, sparsity and dtype (bf16, fp32, fp16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="*", help="backends to run (default: every usable one with a native kernel)")
    p.add_argument("--shapes", nargs="*", help="shape names (default: every headline shape)")
    p.add_argument("--batches", nargs="*", type=int)
    p.add_argument("--sparsities", nargs="*", type=float)
    p.add_argument("--dtypes", nargs="*", choices=list(cases.DTYPES))
    p.add_argument("--kernels", nargs="*", default=["sparse_linear", "ternary_linear"])
    p.add_argument("--reps", type=int, default=25, help="timed repetitions per point (>= 20)")
    p.add_argument("--out", default="bench_out", help="folder for kernels.csv and the PNG plots ('' for none)")
    p.add_argument("--csv", help="also append rows to this CSV (long format)")
    p.add_argument("--json", help="also write rows to this JSON file")
    p.add_argument("--no-flush", action="store_true",
                   help="never flush weights from the caches between calls (short rotations are then cache-resident)")
    p.add_argument("--no-decode", action="store_true", help="skip the end-to-end decode benchmark")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def plan(args) -> list[tuple]:
    shapes = [s for s in cases.HEADLINE_SHAPES if not args.shapes or s[0] in args.shapes]
    batches = args.batches or (cases.BATCHES if args.full else [1])
    dtypes = args.dtypes or (["bf16", "fp32", "fp16"] if args.full else ["bf16"])
    sparse_s = args.sparsities or (cases.SPARSITIES if args.full else [0.0, 0.5, 0.9])
    tern_s = args.sparsities or (cases.SPARSITIES if args.full else [0.5, 0.6125])
    points = []
    for name, in_f, out_f in shapes:
        for dt in dtypes:
            # The quick run adds a batch sweep on one shape, for the speedup-vs-batch plot.
            sweep = cases.BATCHES if (not args.full and not args.batches and name == "llama2-7b.up") else batches
            for m in sweep:
                if m not in batches:
                    sparse_s_m, tern_s_m = [0.5], [0.6125]
                else:
                    sparse_s_m, tern_s_m = sparse_s, tern_s
                points.append(("dense", None, name, in_f, out_f, m, 0.0, dt))
                if "sparse_linear" in args.kernels:
                    for be in _backends_for("sparse_linear", torch.device(args.device), args.backends):
                        points += [("sparse_linear", be, name, in_f, out_f, m, s, dt) for s in sparse_s_m]
                if "ternary_linear" in args.kernels:
                    for be in _backends_for("ternary_linear", torch.device(args.device), args.backends):
                        if m in batches:
                            points.append(("ternary_linear", be, name, in_f, out_f, m, None, dt))
                        points += [("ternary_linear", be, name, in_f, out_f, m, s, dt) for s in tern_s_m if s > 0]
    return points


def run(args) -> tuple[list[Row], float]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    bw = read_bandwidth(device)
    mach = machine_summary(device)
    print(f"# device: {mach['device']}, ISA {mach['isa']}, {mach['threads']} threads, last-level cache "
          f"{mach['llc_mib']:.0f} MiB; DRAM rotation >= {dram_bytes(device) / 2**30:.2f} GiB; "
          f"measured read bandwidth {bw / 1e9:.1f} GB/s", file=sys.stderr)
    points = plan(args)
    try:
        from tqdm import tqdm

        it = tqdm(points, disable=args.quiet, file=sys.stderr, desc="bench")
    except ImportError:
        it = points
    rows, dense_p50, sha = [], {}, _git_sha()
    for kernel, be, name, in_f, out_f, m, s, dt in it:
        x = torch.randn(m, in_f, device=device, dtype=cases.DTYPES[dt])
        k = in_f if s is None else ops.sparsity_to_k(in_f, s)
        if kernel == "dense":
            case = cases.dense(x, out_f)
        elif kernel == "sparse_linear":
            case = cases.sparse_linear(x, out_f, k, be)
        else:
            case = cases.ternary_linear(x, out_f, None if s is None else k, be)
        evict = case.evict and not args.no_flush
        residency = "dram-flushed" if evict else ("cache-resident" if case.evict else "dram")
        # call(i) rotates weights and x; 1 << 30 variants: i is never wrapped by the harness
        t = time_calls(case.call, 1 << 30, device, reps=max(20, args.reps), before=case.flush if evict else None)
        read = case.read
        del case
        key = (name, m, dt)
        if kernel == "dense":
            dense_p50[key] = t.p50
        gbps = read / t.p50 / 1e9
        rows.append(
            Row(kernel, be or "torch", name, in_f, out_f, m, 0.0 if s is None else s, k, dt,
                t.p50 * 1e6, t.p20 * 1e6, t.p80 * 1e6, gbps, gbps * 1e9 / bw,
                dense_p50[key] / t.p50, t.spread, t.attempts, t.wide, residency, mach["device"], mach["isa"],
                mach["threads"], mach["llc_mib"], __version__, sha)
        )
    return rows, bw


def print_table(rows: list[Row]) -> None:
    hdr = f"{'kernel':<15}{'backend':<10}{'shape':<16}{'M':>4}{'dtype':>6}{'s':>8}{'p50 us':>10}" \
          f"{'p20-p80 us':>17}{'GB/s':>8}{'%bw':>6}{'x dense':>9}  flags"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        s = "dense" if r.kernel == "dense" else (f"{r.sparsity:.4g}" if r.sparsity or r.kernel != "ternary_linear"
                                                  else "none")
        print(f"{r.kernel:<15}{r.backend:<10}{r.shape:<16}{r.M:>4}{r.dtype:>6}{s:>8}{r.p50_us:>10.1f}"
              f"{f'{r.p20_us:.0f}-{r.p80_us:.0f}':>17}{r.gbps:>8.1f}{100 * r.bw_frac:>5.0f}%{r.speedup:>8.2f}x"
              f"  {_flags(r)}")


def _flags(r: Row) -> str:
    """Why a row deserves a second look: a wide spread, a cache-resident rotation."""
    out = []
    if r.wide:
        out.append(f"WIDE p80/p20={r.spread:.2f} after {r.attempts} tries")
    if r.residency == "cache-resident":
        out.append("cache-resident")
    return ", ".join(out)


def write(rows: list[Row], csv_path: str | None, json_path: str | None) -> None:
    if csv_path:
        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            if new:
                w.writeheader()
            w.writerows(asdict(r) for r in rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, bw = run(args)
    print_table(rows)
    if rows and args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "kernels.csv")
        if os.path.exists(path):
            os.remove(path)
        write(rows, path, None)
        from .plots import draw_all

        pngs = draw_all(rows, bw, args.out)
        print(f"# wrote {path} and {len(pngs)} plots to {args.out}/", file=sys.stderr)
    if rows:
        write(rows, args.csv, args.json)
    if not args.no_decode:
        from . import decode

        decode.main(["--device", args.device, "--breakdown"] + (["--out", args.out] if args.out else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
