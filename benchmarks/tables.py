"""Markdown tables from a bench run's CSVs: ``python benchmarks/tables.py DIR``.

DIR holds ``kernels.csv`` (``python -m qsparse_kernels.bench --out DIR``) and optionally
``decode.csv`` (``python -m qsparse_kernels.bench.decode --out DIR``). Prints, per dtype, the
batch-1 speedup over dense ``F.linear`` against sparsity for every shape, the achieved fraction of
the measured read bandwidth, the speedup against batch size M, and the decode table.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict


def _load(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _cell(cells: dict, shape: str, s: float, field: str) -> str:
    """A speedup (with the point's p20-p80 range, the dense p50 held fixed) or a bandwidth fraction;
    a point still wide after its repeats carries a dagger, a cache-resident one "(cache)"."""
    r = cells.get((shape, s))
    if r is None:
        return ""
    v = float(r[field])
    if field == "bw_frac":
        return f"{100 * v:.0f}%"
    txt = f"{v:.2f}x"
    if "p20_us" in r and "spread" in r:  # newer CSVs: the spread of the point itself
        p50, p20, p80 = float(r["p50_us"]), float(r["p20_us"]), float(r["p80_us"])
        txt += f" ({v * p50 / p80:.2f}-{v * p50 / p20:.2f})"
    if r.get("wide") == "True":
        txt += " †"
    if r.get("residency") == "cache-resident":
        txt += " (cache)"
    return txt


def kernel_tables(rows: list[dict]) -> str:
    """Speedup and bandwidth tables of one kernels.csv."""
    out = []
    by = defaultdict(dict)  # (kernel, dtype, M) -> {(shape, sparsity): row}
    for r in rows:
        by[(r["kernel"], r["dtype"], int(r["M"]))][(r["shape"], float(r["sparsity"]))] = r
    shapes = sorted({r["shape"] for r in rows})
    sparsities = sorted({float(r["sparsity"]) for r in rows})
    batches = sorted({int(r["M"]) for r in rows})
    for dtype in sorted({r["dtype"] for r in rows}):
        for kernel in ("sparse_linear", "ternary_linear"):
            cells = by.get((kernel, dtype, 1))
            if not cells:
                continue
            body = [[shape] + [_cell(cells, shape, s, "speedup") for s in sparsities] for shape in shapes]
            out.append(f"**{kernel}, {dtype}, M = 1: speedup over dense `F.linear` (p50)**\n")
            out.append(_table(["shape"] + [f"s={s:g}" for s in sparsities], body) + "\n")
            if kernel == "sparse_linear":
                body = [[shape] + [_cell(cells, shape, s, "bw_frac") for s in sparsities] for shape in shapes]
                out.append(f"**{kernel}, {dtype}, M = 1: achieved / measured read bandwidth**\n")
                out.append(_table(["shape"] + [f"s={s:g}" for s in sparsities], body) + "\n")
        for kernel in ("sparse_linear", "ternary_linear"):
            body = []
            for shape in shapes:
                for s in sparsities:
                    cells = [by.get((kernel, dtype, m), {}).get((shape, s)) for m in batches]
                    if any(c is None for c in cells) or len(batches) < 2:
                        continue
                    body.append([shape, f"{s:g}"] + [f"{float(c['speedup']):.2f}x" for c in cells])
            if body:
                out.append(f"**{kernel}, {dtype}: speedup over dense against batch M**\n")
                out.append(_table(["shape", "sparsity"] + [f"M={m}" for m in batches], body) + "\n")
    return "\n".join(out)


def decode_table(rows: list[dict]) -> str:
    """One table per model of a decode.csv: median over the interleaved rounds, with the range."""
    if "ms_per_token_min" not in rows[0]:  # an older single-run CSV
        body = [[r["variant"], f"{float(r['prefill_ms']):.1f}", f"{float(r['prefill_speedup']):.2f}x",
                 f"{float(r['decode_tok_s']):.2f}", f"{float(r['ms_per_token']):.1f}",
                 f"{float(r['decode_speedup']):.2f}x"] for r in rows]
        head = ["variant", "prefill ms", "x dense", "decode tok/s", "ms/token", "x dense"]
        return "**End-to-end greedy decode**\n\n" + _table(head, body) + "\n"
    out = []
    f = lambda r, k, d=1: f"{float(r[k]):.{d}f}"  # noqa: E731
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        body = [[r["variant"], f(r, "ms_per_token"), f"{f(r, 'ms_per_token_min')}-{f(r, 'ms_per_token_max')}",
                 f(r, "decode_tok_s", 2), f"**{f(r, 'decode_speedup', 2)}x**",
                 f"{f(r, 'decode_speedup_min', 2)}-{f(r, 'decode_speedup_max', 2)}x",
                 f(r, "prefill_ms"), f"{f(r, 'prefill_speedup', 2)}x",
                 f"{float(r['weight_bytes_per_token']) / 1e6:.0f}"]
                for r in rs]
        head = ["variant", "ms/token", "range", "tok/s", "x dense", "range", "prefill ms", "x dense", "MB/token"]
        out.append(f"**Decode, {model}: median over {rs[0]['rounds']} interleaved rounds (ratio: median of per-round "
                   f"ratios; LLC {float(rs[0]['llc_mib']):.0f} MiB)**\n\n" + _table(head, body) + "\n")
        split = [r for r in rs if r.get("lm_head_ms")]
        if split:
            body = [[r["variant"], f(r, "lm_head_ms"), f(r, "projections_ms"), f(r, "rest_ms")] for r in split]
            out.append(f"**ms per decoded token, {model} (median over rounds)**\n\n"
                       + _table(["variant", "lm_head", "projections", "rest"], body) + "\n")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = argv[0]
    kpath, dpath = os.path.join(folder, "kernels.csv"), os.path.join(folder, "decode.csv")
    if not os.path.exists(kpath) and not os.path.exists(dpath):
        print(f"tables.py: neither {kpath} nor {dpath} exists", file=sys.stderr)
        return 1
    if os.path.exists(kpath):
        rows = _load(kpath)
        meta = rows[0]
        extra = ""
        if "isa" in meta:
            extra = f", ISA {meta['isa']}, {meta['threads']} threads, LLC {float(meta['llc_mib']):.0f} MiB"
        print(f"_{meta['device']}{extra}, qsparse_kernels {meta['version']} ({meta['git_sha']})_\n")
        print(kernel_tables(rows))
    if os.path.exists(dpath):
        print(decode_table(_load(dpath)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
