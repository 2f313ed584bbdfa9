"""PNG plots drawn from bench rows (the long-format records of :mod:`.__main__` and :mod:`.decode`)."""

from __future__ import annotations

import os
from collections import defaultdict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(kernel: str, backend: str) -> str:
    return f"{kernel} [{backend}]"


def speedup_vs_sparsity(rows, bandwidth: float, path: str, shape: str, M: int = 1, dtype: str = "bf16") -> str | None:
    """Two panels. Left: speedup over dense ``F.linear`` against sparsity per (kernel, backend), with
    the time to read each point's kept weight bytes at the measured read bandwidth (a reference
    line: a GEMV that keeps more loads in flight than the probe may cross it slightly). Its value
    at s = 0 is the *layout* gain (same bytes, better kernel). Right: the *sparsity* gain, each
    kernel against itself at s = 0, beside the ideal ``1 / (1 - s)``."""
    pick = [r for r in rows if r.shape == shape and r.M == M and r.dtype == dtype and r.kernel != "dense"]
    dense = [r for r in rows if r.shape == shape and r.M == M and r.dtype == dtype and r.kernel == "dense"]
    if not pick or not dense:
        return None
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    series = defaultdict(list)
    for r in pick:
        series[(r.kernel, r.backend)].append(r)
    dense_s = dense[0].p50_us * 1e-6
    for i, ((kernel, backend), rs) in enumerate(sorted(series.items())):
        color = f"C{i}"
        rs.sort(key=lambda r: r.sparsity)
        xs = [r.sparsity for r in rs]
        ax.errorbar(xs, [r.speedup for r in rs], yerr=_spread_err(rs, dense_s), fmt="o-", color=color, capsize=3,
                    label=_label(kernel, backend))
        bound = [dense_s / (r.gbps * r.p50_us * 1e-6 * 1e9 / bandwidth) for r in rs]
        ax.plot(xs, bound, ":", color=color, alpha=0.7, label=f"{kernel}: kept bytes at read bandwidth")
        base = [r for r in rs if r.sparsity == 0.0]
        if base:
            gain = [base[0].p50_us / r.p50_us for r in rs]
            ax2.plot(xs, gain, "o-", color=color, label=_label(kernel, backend))
            ax.annotate(f"layout gain {base[0].speedup:.1f}x", (0.0, base[0].speedup), textcoords="offset points",
                        xytext=(6, -12), fontsize=7, color=color)
    s = sorted({r.sparsity for r in pick} | {0.0})
    ax2.plot(s, [1 / (1 - v) for v in s], "k--", alpha=0.6, label="ideal 1/(1-s)")
    for a in (ax, ax2):
        a.axhline(1.0, color="grey", lw=0.8)
        a.set_yscale("log")
        a.set_xlabel("activation sparsity s")
        a.legend(fontsize=7)
    ax.set_ylabel("speedup over dense F.linear (x), p20-p80 bars")
    ax.set_title(f"{shape}, M={M}, {dtype}: vs dense")
    ax2.set_ylabel("speedup over the same kernel at s = 0 (x)")
    ax2.set_title("sparsity gain alone")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _spread_err(rs, dense_s: float):
    """Error bars of a speedup from the point's own p20 / p80 (the dense p50 held fixed)."""
    lo = [r.speedup - dense_s / (r.p80_us * 1e-6) for r in rs]
    hi = [dense_s / (r.p20_us * 1e-6) - r.speedup for r in rs]
    return [[max(0.0, v) for v in lo], [max(0.0, v) for v in hi]]


def speedup_vs_batch(rows, path: str, shape: str, dtype: str = "bf16") -> str | None:
    """Speedup over dense against batch size M, one line per (kernel, backend, sparsity) measured
    at two or more M: where the sparse path stops paying."""
    pick = [r for r in rows if r.shape == shape and r.dtype == dtype and r.kernel != "dense"]
    series = defaultdict(list)
    for r in pick:
        series[(r.kernel, r.backend, r.sparsity)].append(r)
    series = {k: v for k, v in series.items() if len({r.M for r in v}) >= 2}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (kernel, backend, s), rs in sorted(series.items()):
        rs.sort(key=lambda r: r.M)
        tag = "dense activations" if kernel == "ternary_linear" and s == 0 else f"s={s:g}"
        ax.plot([r.M for r in rs], [r.speedup for r in rs], "o-", label=f"{_label(kernel, backend)} {tag}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="dense F.linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch M (tokens per call)")
    ax.set_ylabel("speedup over dense F.linear (x)")
    ax.set_title(f"{shape}, {dtype}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def decode_plot(rows: list[dict], path: str) -> str | None:
    """Decode (``decode.csv`` rows). Left: tokens/s per variant and model, bars from the fastest to
    the slowest round. Right: ms per decoded token split into lm_head / projections / rest, where
    the run measured it (``--breakdown``)."""
    if not rows:
        return None
    plt = _plt()
    split = [r for r in rows if r.get("lm_head_ms") not in ("", None)]
    fig, axes = plt.subplots(1, 2 if split else 1, figsize=(13 if split else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        got = {r["variant"]: r for r in rows if r["model"] == model}
        xs = [j + i * width for j, v in enumerate(variants) if v in got]
        rs = [got[v] for v in variants if v in got]
        tok = [1e3 / float(r["ms_per_token"]) for r in rs]
        lo = [t - 1e3 / float(r["ms_per_token_max"]) for t, r in zip(tok, rs, strict=True)]
        hi = [1e3 / float(r["ms_per_token_min"]) - t for t, r in zip(tok, rs, strict=True)]
        bars = ax.bar(xs, tok, width, yerr=[lo, hi], capsize=3, label=model)
        for b, r in zip(bars, rs, strict=True):
            ax.annotate(f"{float(r['decode_speedup']):.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))])
    ax.set_xticklabels([v.replace("+", "+\n") for v in variants], fontsize=7)
    ax.set_ylabel("decode tokens/s (bars: min-max over rounds)")
    ax.set_title("greedy decode, batch 1 (label: median x dense)")
    ax.legend(fontsize=7)
    if split:
        ax = axes[0][1]
        names = [r["variant"].replace("+", "+\n") for r in split]
        bottom = [0.0] * len(split)
        for key, color in (("lm_head_ms", "C3"), ("projections_ms", "C0"), ("rest_ms", "C7")):
            vals = [max(0.0, float(r[key])) for r in split]
            ax.bar(names, vals, 0.6, bottom=bottom, color=color, label=key.removesuffix("_ms"))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_ylabel("ms per decoded token (median over rounds)")
        ax.set_title(f"where a token's time goes: {split[0]['model']}")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(rows, bandwidth: float, out_dir: str) -> list[str]:
    """The sparsity and batch plots for every shape and dtype in ``rows``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for shape in sorted({r.shape for r in rows}):
        for dtype in sorted({r.dtype for r in rows}):
            p = speedup_vs_sparsity(rows, bandwidth, os.path.join(out_dir, f"sparsity_{shape}_{dtype}.png"), shape,
                                    dtype=dtype)
            q = speedup_vs_batch(rows, os.path.join(out_dir, f"batch_{shape}_{dtype}.png"), shape, dtype=dtype)
            written += [x for x in (p, q) if x]
    return written
