"""The study's report: markdown tables, the paper's claims checked against stated thresholds, plots."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .study import PROJECTIONS  # noqa: E402

# Thresholds of the claim checks (nats per byte of validation loss).
ON_PAR = 0.05  # "on par with dense"
COMPOSE = 0.10  # BitNet + Q-Sparse vs BitNet alone


def _table(head, rows) -> str:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _lower_upper_ratio(run: dict) -> float:
    """Mean over training of (first block's weight-gradient norm / last block's)."""
    ratios = [g[0] / g[-1] for _, g in run["grad_norms"] if g and g[-1] > 0]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def claims(res: dict) -> list[tuple[str, str, str]]:
    """(claim, measured, verdict) rows; a claim whose runs are missing is skipped."""
    r = {k: v["final_val"] for k, v in res["runs"].items()}
    out = []
    if "qsparse-40" in r:
        d = r["qsparse-40"] - r["dense"]
        out.append(("Top-K 40% with STE trains to dense quality", f"{d:+.3f} nats vs dense",
                    "reproduced" if d <= ON_PAR else f"not reproduced (> {ON_PAR} nats)"))
    if "qsparse-40" in r and "qsparse-40-no-ste" in r:
        d = r["qsparse-40-no-ste"] - r["qsparse-40"]
        ste, no = (_lower_upper_ratio(res["runs"][k]) for k in ("qsparse-40", "qsparse-40-no-ste"))
        ok = d > 0 and no < ste
        out.append(("Without STE, training is worse and lower layers get smaller gradients",
                    f"{d:+.3f} nats vs STE; first/last block grad-norm ratio {no:.2f} (no STE) vs {ste:.2f} (STE)",
                    "reproduced" if ok else "not reproduced"))
    if "qsparse-60" in r and "qsparse-40" in r:
        d = r["qsparse-60"] - r["qsparse-40"]
        out.append(("More sparsity costs quality (60% vs 40%, as the scaling law predicts)", f"{d:+.3f} nats",
                    "reproduced" if d > 0 else "not reproduced"))
    sp = res["runs"]["dense"]["sparsity"]
    if "down_proj:natural" in sp:
        z = sp["down_proj:natural"]
        out.append(("Squared ReLU makes the FFN's down-projection input sparse by itself (dense model)",
                    f"{100 * z:.1f}% exact zeros", "reproduced" if z >= 0.5 else "not reproduced (< 50%)"))
    if "bitnet-b1.58" in r and "bitnet-b1.58+qsparse-61.25" in r:
        d = r["bitnet-b1.58+qsparse-61.25"] - r["bitnet-b1.58"]
        out.append(("Q-Sparse composes with BitNet b1.58 (61.25% on ternary weights)", f"{d:+.3f} nats vs BitNet",
                    "reproduced" if d <= COMPOSE else f"not reproduced (> {COMPOSE} nats)"))
    c = res["continue"]
    jump, gap = c["converted"] - c["dense"], c["after"] - c["dense_after"]
    out.append(("Continue-training recovers quality after converting a dense model (50%)",
                f"conversion jump {jump:+.3f} nats; after {c['steps']} steps {gap:+.3f} nats vs the dense model "
                "continued for the same steps",
                "reproduced" if gap <= ON_PAR else f"not reproduced (> {ON_PAR} nats)"))
    return out


def closing_note(res: dict) -> list[str]:
    """Which of the paper's claims this run reproduced, which not, and what limits the evidence."""
    rows = claims(res)
    yes = [c for c, _, v in rows if v == "reproduced"]
    no = [f"{c} ({m}; {v})" for c, m, v in rows if v != "reproduced"]
    s = res["budget"]["shape"]
    lines = ["## Closing note", ""]
    lines.append(f"Reproduced at this scale ({len(yes)} of {len(rows)}): " + ("; ".join(yes) if yes else "none") + ".")
    lines.append("")
    lines.append("Not reproduced: " + ("; ".join(no) if no else "none") + ".")
    lines += [
        "",
        "What limits this evidence:",
        "",
        f"- Scale: a {s['n_layers']}-block, d_model {s['d_model']} model trained on {res['tokens_per_config']:,} "
        "bytes, far below the paper's models and token counts; the claims are checked in direction and "
        "rough size, not in the paper's numbers.",
        "- One seed per configuration: differences of a few hundredths of a nat/byte may be within "
        "seed-to-seed noise, which this study does not measure.",
        "- The FFN is squared ReLU without a gate (`down(relu(up(x))**2)`), in every configuration, so "
        "the comparison is fair; the paper uses the gated ReLU²GLU.",
        "- The no-STE ablation is study-local (`NoSTEQSparseLinear`: the input gradient is masked "
        "like the forward); the library's modules always use the STE.",
        "- Decode speed at this size measures Python and per-call overhead, not weight bytes.",
        "",
    ]
    return lines


def _plots(res: dict, out: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in res["runs"].items():
        steps, vals = zip(*run["curve"], strict=True)
        ax.plot(steps, vals, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Validation loss, same budget and batches per configuration")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
    plt.close(fig)

    names = [n for n in ("dense", "qsparse-40", "qsparse-40-no-ste") if res["runs"].get(n, {}).get("grad_norms")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in names:
        gn = res["runs"][name]["grad_norms"]
        n_layers = len(gn[0][1])
        mean = [sum(g[i] for _, g in gn) / len(gn) for i in range(n_layers)]
        ax.plot(range(n_layers), mean, marker="o", label=name)
    ax.set_xlabel("block (0 = next to the embedding)")
    ax.set_ylabel("weight-gradient norm (mean over training)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(res["runs"][names[0]]["grad_norms"][0][1])) if names else [])
    ax.set_title("Per-block gradient norms, mean over training")
    ax.legend()
    ax.grid(alpha=0.3)
    # A few points in training: each block's norm relative to the last block's, STE vs no STE.
    styles = {"qsparse-40": "-", "qsparse-40-no-ste": "--"}
    for name in (n for n in names if n in styles):
        gn = res["runs"][name]["grad_norms"]
        picks = sorted({0, len(gn) // 4, len(gn) // 2, len(gn) - 1})
        for j, i in enumerate(picks):
            step, g = gn[i]
            if not g[-1] > 0:
                continue
            ax2.plot(range(len(g)), [x / g[-1] for x in g], ls=styles.get(name, "-"), marker="o",
                     color=plt.cm.viridis(j / max(1, len(picks) - 1)), label=f"{name}, step {step}")
    ax2.set_xlabel("block (0 = next to the embedding)")
    ax2.set_xticks(ax.get_xticks())
    ax2.set_ylabel("norm / last block's norm")
    ax2.set_title("At a few training steps (solid STE, dashed no STE)")
    ax2.legend(fontsize=6, ncol=2)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "grad_norms.png"), dpi=110)
    plt.close(fig)

    c = res["continue"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps, vals = zip(*c["run"]["curve"], strict=True)
    ax.plot(steps, vals, marker=".", label="dense -> Q-Sparse 50%, continue-training")
    # Step 0 of the baseline: the trained dense model's last evaluation (same validation windows).
    start = [(0, res["runs"]["dense"]["curve"][-1][1])] if res["runs"]["dense"]["curve"] else []
    steps, vals = zip(*(start + list(c["dense_run"]["curve"])), strict=True)
    ax.plot(steps, vals, marker=".", color="k", ls="--", label="dense model, continued the same way")
    ax.set_xlabel("continue-training step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "continue_training.png"), dpi=110)
    plt.close(fig)


def write(res: dict, out: str) -> None:
    _plots(res, out)
    b = res["budget"]
    s = b["shape"]
    runs = res["runs"]
    dense = runs["dense"]
    c = res["continue"]
    lines = [
        "# Q-Sparse training study (small scale, 2-core CPU)" + (" — QUICK smoke run" if res["quick"] else ""),
        "",
        "Reproduce: `python -m benchmarks.training" + (" --quick" if res["quick"] else "") + "` (this file, "
        "`results.json` and the PNGs are written by it; nothing here is edited by hand).",
        "",
        f"Model: decoder-only byte LM, d_model {s['d_model']}, {s['n_layers']} blocks, {s['n_heads']} heads, "
        f"squared-ReLU FFN {s['d_ff']} (in every configuration), context {s['ctx']}, dense `lm_head`. "
        f"Corpus: this Python's ({res['corpus']['python']}) standard-library sources, "
        f"{res['corpus']['train_bytes']:,} training bytes ({res['corpus']['files'][0]} files) and "
        f"{res['corpus']['val_bytes']:,} validation bytes ({res['corpus']['files'][1]} held-out files). "
        f"Budget: {b['steps']} steps x batch {b['batch']} x {s['ctx']} = {res['tokens_per_config']:,} tokens per "
        f"configuration, AdamW (lr {b['lr']}, warm-up {b['warmup']}, cosine to 10%), fp32, same seed and batches. "
        f"Every Q-Sparse / BitNet configuration is `qsparse_kernels.convert()` of the same initial model "
        f"(`QSparseLinear` / `BitLinear` on q, k, v, o, up, down). Total time {res['total_seconds'] / 60:.1f} min.",
        "",
        "## Validation loss",
        "",
        _table(
            ["configuration", "val loss (nats/byte)", "vs dense", "train time (s)", "decode tok/s", "decode vs dense"],
            [
                [k, f"{v['final_val']:.4f}", f"{v['final_val'] - dense['final_val']:+.4f}", f"{v['seconds']:.0f}",
                 f"{v['decode_tok_s']:.1f}", f"{v['decode_tok_s'] / dense['decode_tok_s']:.2f}x"]
                for k, v in runs.items()
            ],
        ),
        "",
        "Decode: greedy, batch 1, KV cache, the trained model in eval mode through the library's kernels "
        "(ternary layers packed), best of 3, same run. At this model size a token is dominated by per-call "
        "overheads, not by weight bytes, so these ratios say little about large models (see "
        "benchmarks/README.md for TinyLlama shapes).",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## The paper's claims at this scale",
        "",
        f"Thresholds: 'on par' = within {ON_PAR} nats/byte of dense; 'composes' = within {COMPOSE} nats of BitNet.",
        "",
        _table(["claim", "measured", "verdict"], claims(res)),
        "",
        "## Per-block gradient norms (STE vs no STE)",
        "",
        "Weight-gradient norm of each block's projections (q, k, v, o, up, down together), mean over the steps "
        f"recorded every {b['grad_every']} steps (before clipping). Without the STE a dropped input entry "
        "passes no gradient down, so the blocks nearer the embedding should receive less.",
        "",
        _table(
            ["configuration"] + [f"block {i}" for i in range(s["n_layers"])] + ["first / last"],
            [
                [k] + [f"{sum(g[i] for _, g in runs[k]['grad_norms']) / len(runs[k]['grad_norms']):.4f}"
                       for i in range(s["n_layers"])] + [f"{_lower_upper_ratio(runs[k]):.2f}"]
                for k in ("dense", "qsparse-40", "qsparse-40-no-ste") if k in runs and runs[k]["grad_norms"]
            ],
        ),
        "",
        "![gradient norms](grad_norms.png)",
        "",
        "## Measured activation sparsity per projection (validation batches)",
        "",
        "Fraction of exact zeros in what each projection multiplies (after its top-K / N:M selection); "
        "in parentheses the zeros already in its input.",
        "",
        _table(
            ["configuration"] + list(PROJECTIONS),
            [
                [k] + [f"{100 * v['sparsity'].get(p + ':effective', float('nan')):.1f}% "
                       f"({100 * v['sparsity'].get(p + ':natural', float('nan')):.1f}%)" for p in PROJECTIONS]
                for k, v in runs.items()
            ],
        ),
        "",
        "## Continue-training: dense -> Q-Sparse 50%",
        "",
        _table(
            ["stage", "val loss"],
            [
                ["trained dense", f"{c['dense']:.4f}"],
                ["converted to Q-Sparse 50%, no training", f"{c['converted']:.4f}"],
                [f"after {c['steps']} continue-training steps", f"{c['after']:.4f}"],
                [f"baseline: dense continued {c['steps']} steps", f"{c['dense_after']:.4f}"],
            ],
        ),
        "",
        "![continue-training](continue_training.png)",
        "",
    ] + closing_note(res)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))
