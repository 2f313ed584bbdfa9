"""PNG plots drawn from bench rows (the long-format records of :mod:`.__main__`)."""

from __future__ import annotations

import os
from collections import defaultdict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speedup_vs_sparsity(rows, bandwidth: float, path: str, shape: str, M: int = 1, dtype: str = "bf16") -> str | None:
    """Speedup over dense per (kernel, backend) against sparsity, with the ideal ``1 / (1 - s)``
    line and the bandwidth roofline (dense time / time to read the kept bytes at the measured
    read bandwidth)."""
    pick = [r for r in rows if r.shape == shape and r.M == M and r.dtype == dtype and r.kernel != "dense"]
    dense = [r for r in rows if r.shape == shape and r.M == M and r.dtype == dtype and r.kernel == "dense"]
    if not pick or not dense:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = defaultdict(list)
    for r in pick:
        series[(r.kernel, r.backend)].append(r)
    for (kernel, backend), rs in sorted(series.items()):
        rs.sort(key=lambda r: r.sparsity)
        ax.plot([r.sparsity for r in rs], [r.speedup for r in rs], "o-", label=f"{kernel} [{backend}]")
        roof = [dense[0].p50_us * 1e-6 / (r.gbps * 1e9 * r.p50_us * 1e-6 / bandwidth) for r in rs]
        ax.plot([r.sparsity for r in rs], roof, ":", alpha=0.6, label=f"{kernel} bandwidth roofline")
    s = sorted({r.sparsity for r in pick})
    ax.plot(s, [1 / (1 - v) for v in s], "k--", alpha=0.5, label="ideal 1/(1-s) (float weights)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("activation sparsity s")
    ax.set_ylabel("speedup over dense F.linear (x)")
    ax.set_title(f"{shape}, M={M}, {dtype}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def speedup_vs_batch(rows, path: str, shape: str, sparsity: float = 0.5, dtype: str = "bf16") -> str | None:
    """Speedup over dense against batch size M at one sparsity: where the sparse path stops paying."""
    pick = [r for r in rows if r.shape == shape and r.dtype == dtype and r.kernel != "dense"
            and abs(r.sparsity - sparsity) < 1e-9]
    if len({r.M for r in pick}) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = defaultdict(list)
    for r in pick:
        series[(r.kernel, r.backend)].append(r)
    for (kernel, backend), rs in sorted(series.items()):
        rs.sort(key=lambda r: r.M)
        ax.plot([r.M for r in rs], [r.speedup for r in rs], "o-", label=f"{kernel} [{backend}]")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch M (tokens per call)")
    ax.set_ylabel("speedup over dense F.linear (x)")
    ax.set_title(f"{shape}, sparsity {sparsity}, {dtype}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_all(rows, bandwidth: float, out_dir: str) -> list[str]:
    """Both plots for every shape in ``rows``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for shape in sorted({r.shape for r in rows}):
        for dtype in sorted({r.dtype for r in rows}):
            p = speedup_vs_sparsity(rows, bandwidth, os.path.join(out_dir, f"sparsity_{shape}_{dtype}.png"), shape,
                                    dtype=dtype)
            q = speedup_vs_batch(rows, os.path.join(out_dir, f"batch_{shape}_{dtype}.png"), shape, dtype=dtype)
            written += [x for x in (p, q) if x]
    return written
