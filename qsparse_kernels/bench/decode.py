"""End-to-end greedy decoding: dense vs Q-Sparse vs BitNet b1.58 (+ Q-Sparse), tokens/s.

``python -m qsparse_kernels.bench.decode`` builds Llama-architecture models (default TinyLlama-1.1B
shapes: hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV heads, vocabulary 32000; or
``--hf-config config.json``) with random bf16 weights, one per variant (:data:`VARIANTS`), and
times a 16-token prompt (prefill, the batched path) and 64 greedy tokens (decode, batch 1).

Method (SPEC "How speed is measured"): the variants run interleaved round-robin (dense, A, B, ...,
dense, A, B, ...) over ``--rounds`` rounds (>= 5) after a warm-up; per variant the median
ms/token with its range over the rounds, and the ratio to dense as the median of the per-round
ratios (each against the dense run of the same round), with its range. A dense baseline whose
range exceeds 10% of its median is flagged.

A second model ("the LLC row") is sized to leave the last-level cache: Llama-2-7B layer shapes
with as many layers as make the *ternary* weights read per token >= 4x this machine's LLC
(so no variant decodes from cache). Its ternary variants are built packed directly (random codes,
no float weights), and its float variants cycle a pool of distinct layers that together hold
>= 4x the LLC (a layer's weights come back after the others have flushed them), so the run never
holds two full dense copies. Both models print their weight bytes per token beside the LLC.

Attention is the same for every variant, dense included: ``--attention upcast`` (the default)
computes bf16 / fp16 CPU attention in float32 (:mod:`qsparse_kernels.attention`), ``--attention
sdpa`` runs torch's SDPA in the model's dtype (slower on the CPU; Hugging Face's default).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

from .harness import LLC_FACTOR, llc_bytes, machine_summary, read_bandwidth
from .llama import ATTENTION, ATTENTION_HELP, LlamaDecoder, LlamaShape

# name -> QSparseConfig keyword arguments (None: the dense model as built, lm_head an nn.Linear).
# Every converted variant's lm_head is a DenseHead (convert's default: dense, row-major, the
# library's dense GEMV at 1-4 rows); "linear_head" keeps it the plain nn.Linear (torch's GEMV),
# which isolates what the DenseHead does to a token.
VARIANTS = {
    "dense": None,
    "qsparse-0.5": dict(sparsity=0.5, weights="dense"),
    "bitnet-b1.58": dict(sparsity=0.0, weights="ternary", pack=True),
    "bitnet-b1.58+qsparse-0.6125": dict(sparsity=0.6125, weights="ternary", pack=True),
    "bitnet-b1.58+qsparse-0.6125+linear-head": dict(sparsity=0.6125, weights="ternary", pack=True, linear_head=True),
}
# The LLC row runs these (the linear-head variant adds nothing there that the TinyLlama row lacks).
LLC_VARIANTS = ["dense", "qsparse-0.5", "bitnet-b1.58", "bitnet-b1.58+qsparse-0.6125"]
LLAMA2_7B = LlamaShape(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)
BREAKDOWN_ROUNDS = 3  # --breakdown's rounds at most (each times every variant three times)
DENSE_SPREAD_WARN = 0.10  # (max - min) / median of the dense ms/token above this: flagged
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _projections(layer: nn.Module):
    """(parent module, attribute name, module) of each projection of a decoder layer."""
    for parent in (layer.self_attn, layer.mlp):
        for name in PROJECTIONS:
            if hasattr(parent, name):
                yield parent, name, getattr(parent, name)


def _random_init(model: nn.Module, gen: torch.Generator) -> None:
    """N(0, 0.02) float weights, norms 1, random canonical ternary codes for packed layers."""
    from .cases import random_packed

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for mod in model.modules():
            if "packed" in getattr(mod, "_buffers", {}):
                mod.packed.copy_(random_packed(mod.in_features, mod.out_features, mod.packed.device, gen))
                mod.scale.fill_(0.02)


def build(shape: LlamaShape, variant: str, device: str, dtype=torch.bfloat16, seed: int = 0,
          distinct_layers: int | None = None, direct_ternary: bool = False, attention: str = "upcast") -> LlamaDecoder:
    """The model for one variant: random weights from ``seed``, converted in place.

    ``distinct_layers``: only that many distinct decoder layers, cycled over the
    ``num_hidden_layers`` positions (the same bytes per token, less memory; the LLC row's float
    variants). ``direct_ternary``: ternary variants get packed ``BitLinear`` layers with random
    codes directly, without float weights (the LLC row). ``attention``: a key of
    :data:`.llama.ATTENTION`, the same for every variant of a run."""
    import qsparse_kernels as qk

    cfg = VARIANTS[variant]
    with torch.device("meta"):
        model = LlamaDecoder(shape, attention)
    if distinct_layers:
        model.layers = nn.ModuleList(model.layers[i % distinct_layers] for i in range(shape.num_hidden_layers))
    ternary_direct = cfg is not None and cfg.get("weights") == "ternary" and direct_ternary
    if ternary_direct:
        sparsity = cfg["sparsity"] or None
        for layer in {id(m): m for m in model.layers}.values():
            for parent, name, lin in list(_projections(layer)):
                bl = qk.nn.BitLinear(lin.in_features, lin.out_features, sparsity=sparsity, device="meta")
                bl._to_packed_mode()  # empty packed buffers; _random_init fills them after to_empty
                setattr(parent, name, bl)
    model = model.to_empty(device=device).to(dtype)
    _random_init(model, torch.Generator(device=device).manual_seed(seed))
    if cfg is not None and not ternary_direct:
        convert_variant(model, variant)
    elif cfg is not None and not cfg.get("linear_head"):  # what convert's fast_head does to the head
        from ..convert import use_dense_head

        use_dense_head(model)
    return model.eval()


def convert_variant(model: nn.Module, variant: str) -> None:
    """``qsparse_kernels.convert`` as :data:`VARIANTS` says (nothing for ``dense``); ``linear_head``
    keeps the output head an ``nn.Linear``."""
    import qsparse_kernels as qk

    cfg = VARIANTS[variant]
    if cfg is None:
        return
    cfg = dict(cfg)
    fast_head = not cfg.pop("linear_head", False)
    qk.convert(model, qk.QSparseConfig(**cfg), fast_head=fast_head)


def weight_bytes_per_token(model: LlamaDecoder) -> int:
    """Weight bytes one decoded token must read: every projection's kept rows (per layer position,
    so a cycled layer counts each time) and the output head."""
    from ..convert_report import weight_bytes_per_token as read

    return read(model.lm_head) + projection_bytes_per_token(model)


def projection_bytes_per_token(model: LlamaDecoder) -> int:
    """The projections' share of :func:`weight_bytes_per_token` (no head)."""
    from ..convert_report import weight_bytes_per_token as read

    return sum(read(m) for layer in model.layers for _, _, m in _projections(layer))


def time_variant(model: LlamaDecoder, prompt: torch.Tensor, n_new: int) -> dict:
    """Prefill milliseconds and decode ms/token of one greedy generation."""
    marks = {}

    def timer(phase):
        if prompt.is_cuda:
            torch.cuda.synchronize()
        marks[phase] = time.perf_counter()

    model.generate(prompt, n_new, timer=timer)
    decode_s = marks["decode"] - marks["prefill"]
    return {"prefill_ms": 1e3 * (marks["prefill"] - marks["start"]), "ms_per_token": 1e3 * decode_s / (n_new - 1)}


class _Zeros(nn.Module):
    """Stands in for a projection in :func:`breakdown`: returns zeros of the right shape, no work."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros((*x.shape[:-1], self.out_features))


@contextlib.contextmanager
def _swapped(model: LlamaDecoder, head: bool, projections: bool):
    """Temporarily replaces the head and/or every projection by :class:`_Zeros`."""
    saved = []
    if head:
        saved.append((model, "lm_head", model.lm_head))
    if projections:
        for layer in {id(m): m for m in model.layers}.values():
            saved += list(_projections(layer))
    try:
        for parent, name, mod in saved:
            setattr(parent, name, _Zeros(mod.out_features))
        yield model
    finally:
        for parent, name, mod in saved:
            setattr(parent, name, mod)


def breakdown(models: dict[str, LlamaDecoder], prompt: torch.Tensor, n_new: int,
              rounds: int) -> tuple[dict[str, dict], list[float]]:
    """Milliseconds per decoded token spent in ``lm_head``, in the other projections and in the rest,
    per variant; and the read bandwidth (bytes/s, :func:`read_bandwidth`) measured once per round.

    Times each model as it is, then with ``lm_head`` replaced by a module that returns zeros, then
    with every projection replaced as well; the differences of the three times' medians over
    ``rounds`` rounds (variants interleaved round-robin) are the shares, so they add up to the
    total. The bandwidth is measured inside the rounds because on a shared machine it moves as much
    as the timings do (one run read 53 GB/s, the next ones 23-31). The models are restored."""
    times = {v: ([], [], []) for v in models}  # full, no head, neither head nor projections
    bandwidths = []
    for _ in range(rounds):
        for v, model in models.items():
            full, no_head, rest = times[v]
            full.append(time_variant(model, prompt, n_new)["ms_per_token"])
            with _swapped(model, head=True, projections=False):
                no_head.append(time_variant(model, prompt, n_new)["ms_per_token"])
            with _swapped(model, head=True, projections=True):
                rest.append(time_variant(model, prompt, n_new)["ms_per_token"])
        bandwidths.append(read_bandwidth(prompt.device, reps=3))
    out = {}
    for v, ts in times.items():
        full, no_head, rest = (statistics.median(t) for t in ts)
        out[v] = {"total": full, "lm_head": full - no_head, "projections": no_head - rest, "rest": rest}
    return out, bandwidths


def _summary(values: list[float]) -> dict:
    return {"p50": statistics.median(values), "min": min(values), "max": max(values)}


def run_rounds(models: dict[str, LlamaDecoder], prompt: torch.Tensor, n_new: int, rounds: int,
               label: str = "") -> dict[str, dict]:
    """Every model once per round, round-robin, dense first; per variant the median and range of
    ms/token and prefill, and of the per-round ratios to dense."""
    for m in models.values():  # warm-up: first calls, allocator, autotune caches
        m.generate(prompt[:, :4], 3)
    runs = {v: [] for v in models}
    for r in range(rounds):
        for v, m in models.items():
            runs[v].append(time_variant(m, prompt, n_new))
        line = ", ".join(f"{v} {runs[v][-1]['ms_per_token']:.1f}" for v in models)
        print(f"#   {label}round {r + 1}/{rounds} ms/token: {line}", file=sys.stderr, flush=True)
    out = {}
    dense = runs["dense"]
    for v, rs in runs.items():
        out[v] = {
            "ms_per_token": _summary([x["ms_per_token"] for x in rs]),
            "prefill_ms": _summary([x["prefill_ms"] for x in rs]),
            "decode_speedup": _summary([d["ms_per_token"] / x["ms_per_token"] for d, x in zip(dense, rs, strict=True)]),
            "prefill_speedup": _summary([d["prefill_ms"] / x["prefill_ms"] for d, x in zip(dense, rs, strict=True)]),
            "rounds": len(rs),
        }
    return out


def _dense_spread_warning(results: dict, label: str) -> str | None:
    d = results["dense"]["ms_per_token"]
    spread = (d["max"] - d["min"]) / d["p50"]
    if spread > DENSE_SPREAD_WARN:
        return (f"WARNING [{label}]: the dense baseline moved {100 * spread:.0f}% over the rounds "
                f"({d['min']:.1f}-{d['max']:.1f} ms/token): the machine was disturbed; read the ratios' ranges")
    return None


def llc_model(base: LlamaShape, llc: int, layers: int | None = None) -> tuple[LlamaShape, int]:
    """``base`` with enough layers that its ternary projections (2 bits per weight) hold
    >= 4x ``llc`` bytes, and the number of distinct float layers whose weights hold >= 4x ``llc``."""
    h, f = base.hidden_size, base.intermediate_size
    kv = base.num_key_value_heads * base.head_dim
    params = 2 * h * h + 2 * h * kv + 3 * h * f  # q, o, k, v, gate, up, down
    need = LLC_FACTOR * llc
    n = layers or max(2, math.ceil(need / (params / 4)))
    pool = min(n, max(2, math.ceil(need / (2 * params))))  # bf16 layers
    return LlamaShape(**{**base.__dict__, "num_hidden_layers": n}), pool


def _print_table(title: str, results: dict, bytes_per_token: dict) -> None:
    print(f"\n{title}")
    print(f"{'variant':<40}{'ms/token':>10}{'min-max':>15}{'tok/s':>8}{'x dense':>9}{'min-max':>13}"
          f"{'prefill ms':>12}{'x dense':>9}{'MB/token':>10}")
    for v, r in results.items():
        t, s, p, ps = r["ms_per_token"], r["decode_speedup"], r["prefill_ms"], r["prefill_speedup"]
        print(f"{v:<40}{t['p50']:>10.1f}{_rng(t, 1):>15}{1e3 / t['p50']:>8.2f}{s['p50']:>8.2f}x{_rng(s, 2, 'x'):>13}"
              f"{p['p50']:>12.1f}{ps['p50']:>8.2f}x{bytes_per_token[v] / 1e6:>10.1f}")


def _rng(d: dict, digits: int, unit: str = "") -> str:
    return f"{d['min']:.{digits}f}-{d['max']:.{digits}f}{unit}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_kernels.bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hf-config", help="an HF config.json of a Llama-architecture model (default: TinyLlama-1.1B)")
    p.add_argument("--layers", type=int, help="override the layer count (quicker runs)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5 for quoted figures)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="bench_out", help="folder for decode.csv and decode.png ('' for none)")
    p.add_argument("--breakdown", action="store_true",
                   help="also split each variant's ms/token into lm_head, projections and the rest (medians of "
                        f"min(--rounds, {BREAKDOWN_ROUNDS}) more rounds)")
    p.add_argument("--no-llc-row", action="store_true", help="skip the model sized to leave the last-level cache")
    p.add_argument("--llc-config", help="HF config.json for the LLC row's layer shapes (default: Llama-2-7B)")
    p.add_argument("--llc-layers", type=int, help="the LLC row's layer count (default: from this machine's LLC)")
    p.add_argument("--llc-new-tokens", type=int, default=16)
    p.add_argument("--attention", default="upcast", choices=list(ATTENTION), help=ATTENTION_HELP)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")

    mach = machine_summary(torch.device(args.device))
    llc = llc_bytes(args.device)
    shape = LlamaShape.from_hf_config(args.hf_config) if args.hf_config else LlamaShape()
    if args.layers:
        shape = LlamaShape(**{**shape.__dict__, "num_hidden_layers": args.layers})
    gen = torch.Generator().manual_seed(1)
    variants = ["dense"] + [v for v in args.variants if v != "dense"]
    print(f"# decode on {mach['device']} ({mach['isa']}, {mach['threads']} threads, LLC {llc / 2**20:.0f} MiB): "
          f"{args.rounds} interleaved rounds, attention {args.attention}", file=sys.stderr)
    tables = []  # (model label, results, bytes per token)

    # Row 1: the model as given (TinyLlama-1.1B shapes by default).
    prompt = torch.randint(0, shape.vocab_size, (1, args.prompt_len), generator=gen).to(args.device)
    label = "tinyllama-1.1b" if not args.hf_config else os.path.basename(args.hf_config)
    print(f"# {label}: {shape}, prompt {args.prompt_len}, {args.new_tokens} new tokens", file=sys.stderr)
    models = _build_all(shape, variants, args.device, label, attention=args.attention)
    bpt = {v: weight_bytes_per_token(m) for v, m in models.items()}
    results = run_rounds(models, prompt, args.new_tokens, args.rounds, f"{label} ")
    if args.breakdown:
        split_rounds = min(args.rounds, BREAKDOWN_ROUNDS)
        split, bandwidths = breakdown(models, prompt, args.new_tokens, split_rounds)
        bw = statistics.median(bandwidths)  # the floor's bandwidth, measured in the breakdown's rounds
        for v, sp in split.items():
            results[v]["split"] = {**sp, "floor": 1e3 * projection_bytes_per_token(models[v]) / bw}
    tables.append((label, results, bpt))
    del models

    # Row 2: a model whose ternary weights leave the last-level cache.
    if not args.no_llc_row:
        base = LlamaShape.from_hf_config(args.llc_config) if args.llc_config else LLAMA2_7B
        big, pool = llc_model(base, llc, args.llc_layers)
        big_label = f"llc-row ({big.num_hidden_layers} layers of {'Llama-2-7B' if not args.llc_config else 'config'})"
        print(f"# {big_label}: {big}, float layers cycle a pool of {pool}; prompt {args.prompt_len}, "
              f"{args.llc_new_tokens} new tokens", file=sys.stderr)
        prompt = torch.randint(0, big.vocab_size, (1, args.prompt_len), generator=gen).to(args.device)
        big_variants = [v for v in LLC_VARIANTS if v in variants]
        models = _build_all(big, big_variants, args.device, big_label, distinct_layers=pool, direct_ternary=True,
                            attention=args.attention)
        bpt_big = {v: weight_bytes_per_token(m) for v, m in models.items()}
        res_big = run_rounds(models, prompt, args.llc_new_tokens, args.rounds, "llc-row ")
        tables.append((big_label, res_big, bpt_big))
        del models

    warnings = []
    for lab, res, bpt_ in tables:
        _print_table(f"{lab}: median over {args.rounds} interleaved rounds (LLC {llc / 2**20:.0f} MiB)", res, bpt_)
        w = _dense_spread_warning(res, lab)
        if w:
            warnings.append(w)
    if args.breakdown:
        title = f"ms per decoded token (median of {split_rounds})"
        print(f"\n{title:<40}{'total':>9}{'lm_head':>9}{'projections':>13}{'rest':>9}"
              f"{'proj floor':>12}{'proj/floor':>12}")
        for v, r in tables[0][1].items():
            sp = r["split"]
            print(f"{v:<40}{sp['total']:>9.1f}{sp['lm_head']:>9.1f}{sp['projections']:>13.1f}{sp['rest']:>9.1f}"
                  f"{sp['floor']:>12.1f}{sp['projections'] / sp['floor']:>11.2f}x")
        print("# proj floor: the projections' kept weight bytes per token / the read bandwidth measured in this "
              f"run's breakdown rounds (median {bw / 1e9:.1f} GB/s [{min(bandwidths) / 1e9:.1f}, "
              f"{max(bandwidths) / 1e9:.1f}], amax over a DRAM-sized buffer; a kernel with more loads in flight "
              "can beat it)")
    for w in warnings:
        print(w, file=sys.stderr)
    if args.out:
        _write(args.out, tables, mach, args.attention)
    return 0


def _build_all(shape, variants, device, label, **kw) -> dict[str, LlamaDecoder]:
    models = {}
    for v in variants:
        t0 = time.perf_counter()
        models[v] = build(shape, v, device, **kw)
        print(f"#   {label}: built {v} in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return models


CSV_FIELDS = ["model", "variant", "rounds", "ms_per_token", "ms_per_token_min", "ms_per_token_max", "decode_tok_s",
              "decode_speedup", "decode_speedup_min", "decode_speedup_max", "prefill_ms", "prefill_ms_min",
              "prefill_ms_max", "prefill_speedup", "prefill_speedup_min", "prefill_speedup_max",
              "weight_bytes_per_token", "lm_head_ms", "projections_ms", "rest_ms", "device", "isa", "threads",
              "llc_mib", "attention"]


def _write(out: str, tables, mach: dict, attention: str) -> None:
    os.makedirs(out, exist_ok=True)
    rows = []
    for label, res, bpt in tables:
        for v, r in res.items():
            row = {"model": label, "variant": v, "rounds": r["rounds"], "decode_tok_s": 1e3 / r["ms_per_token"]["p50"],
                   "weight_bytes_per_token": bpt[v], **{k: mach[k] for k in ("device", "isa", "threads", "llc_mib")},
                   "attention": attention}
            for key in ("ms_per_token", "decode_speedup", "prefill_ms", "prefill_speedup"):
                row[key], row[key + "_min"], row[key + "_max"] = r[key]["p50"], r[key]["min"], r[key]["max"]
            sp = r.get("split", {})
            row.update({"lm_head_ms": sp.get("lm_head", ""), "projections_ms": sp.get("projections", ""),
                        "rest_ms": sp.get("rest", "")})
            rows.append(row)
    with open(os.path.join(out, "decode.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})
    from .plots import decode_plot

    path = decode_plot(rows, os.path.join(out, "decode.png"))
    print(f"# wrote {out}/decode.csv and {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
