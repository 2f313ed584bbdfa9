"""Hugging Face ``LlamaForCausalLM.generate()`` beside the compact Llama: is the converted model as
fast in the framework users run as in the lean decoder the decode benchmark times?

    python -m qsparse_kernels.bench.hf_generate [--layers N] [--rounds 5] [--prompt-len 16 128] [--dtype fp16]
        [--attention sdpa]

Builds, per variant (``dense``, ``qsparse-0.5``, ``bitnet-b1.58``, ``bitnet-b1.58+qsparse-0.6125``),
an HF ``LlamaForCausalLM`` and the compact :class:`.llama.LlamaDecoder` with TinyLlama-1.1B shapes
(``--layers`` fewer for a quick run), random weights (bf16, or ``--dtype``), converted by
:func:`qsparse_kernels.convert` (sibling projections fused, the default). Every (model, variant)
pair decodes once per round, round-robin, ``--rounds`` rounds after a warm-up; each prompt length
is its own set of rounds.

Per model and variant: decode ms/token and prefill ms (median [min, max] over rounds), and the
ratio to that model's dense run of the same round (median [min, max]). The last column is the HF
ratio over the compact ratio (median of per-round quotients): 1.0 means the framework keeps the
whole speedup. HF timing: a streamer marks the first generated token (prefill) and the last;
decode ms/token = (last - first) / (new tokens - 1). Greedy, no EOS stop (the end-of-sequence
token switched off, not ``min_new_tokens``: see :func:`time_hf`), KV cache on.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from ..attention import use_cpu_attention
from .cases import DTYPES
from .decode import VARIANTS, _random_init, build, convert_variant
from .harness import machine_summary
from .llama import ATTENTION, ATTENTION_HELP, LlamaShape

DEFAULT_VARIANTS = ["dense", "qsparse-0.5", "bitnet-b1.58", "bitnet-b1.58+qsparse-0.6125"]


def hf_model(shape: LlamaShape, variant: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
             attention: str = "upcast"):
    """HF ``LlamaForCausalLM`` with ``shape``, random ``dtype`` weights from ``seed``, converted as
    ``variant``; ``attention`` (:data:`.llama.ATTENTION`'s keys): ``upcast`` sets it to
    :func:`qsparse_kernels.attention.use_cpu_attention`, ``sdpa`` keeps HF's default."""
    import transformers

    if attention not in ATTENTION:
        raise ValueError(f"attention: expected one of {list(ATTENTION)}, got {attention!r}")
    cfg = transformers.LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size,
        rms_norm_eps=shape.rms_norm_eps, rope_theta=shape.rope_theta, tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    _random_init(model, torch.Generator().manual_seed(seed))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # to_empty left its inv_freq unset
    convert_variant(model, variant)
    if attention == "upcast":
        use_cpu_attention(model)
    model.generation_config.pad_token_id = 0
    return model.eval()


class _Marks:
    """A ``generate()`` streamer that records when each put() (prompt, then every new token) happens."""

    def __init__(self):
        self.t: list[float] = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def time_hf(model, prompt: torch.Tensor, n_new: int) -> dict:
    """Greedy ``generate()`` of exactly ``n_new`` tokens. The end-of-sequence token is switched off
    (a copy of the generation config) rather than forced away with ``min_new_tokens``, whose
    logits processor runs ``torch.isin`` over the whole vocabulary every token (~0.9 ms of a
    21 ms BitNet + Q-Sparse token on Zen 4): work a served model does not do."""
    marks = _Marks()
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = []  # None would fall back to the model config's
    config.max_new_tokens, config.do_sample = n_new, False
    t0 = time.perf_counter()
    model.generate(prompt, generation_config=config, streamer=marks, attention_mask=torch.ones_like(prompt))
    if len(marks.t) != n_new + 1:
        raise RuntimeError(f"generate() produced {len(marks.t) - 1} tokens, expected {n_new}")
    first, last = marks.t[1], marks.t[-1]
    return {"prefill_ms": 1e3 * (first - t0), "ms_per_token": 1e3 * (last - first) / (n_new - 1)}


def time_compact(model, prompt: torch.Tensor, n_new: int) -> dict:
    from .decode import time_variant

    return time_variant(model, prompt, n_new)


def add_ab_args(ap: argparse.ArgumentParser) -> None:
    """The ``--hf`` end-to-end A/B options shared by the kernel benchmarks that have one
    (benchmarks/bench_attention.py, bench_rms_norm.py): see :func:`settings_ab`."""
    ap.add_argument("--hf", action="store_true", help="HF generate() end to end instead (see the top)")
    ap.add_argument("--variants", nargs="+", default=["dense", "bitnet-b1.58", "bitnet-b1.58+qsparse-0.6125"])
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--new-tokens", type=int, default=12)


def settings_ab(models: dict, settings: dict, prompt_lens: list[int], new_tokens: int, rounds: int,
                vocab_size: int, title: str) -> dict:
    """A / B of two settings of the same HF models, end to end: ``settings`` maps two names to
    functions that set a model up (``set_attn_implementation``, a module swap, ...). Every
    (model, setting) pair generates once per round, interleaved (:func:`.harness.round_order`),
    after a warm-up round; prints decode ms/token and prefill ms, median [min, max] over
    ``rounds``, and the first setting's time over the second's (median of per-round ratios
    [min, max]). Returns ``{(prompt_len, model, setting): [time_hf's dict per round]}``."""
    from .harness import round_order

    first, second = settings
    gen = torch.Generator().manual_seed(1)
    print(f"# {title}; {torch.get_num_threads()} threads; decode ms/token and prefill ms, median of {rounds} "
          f"interleaved rounds [min, max]; {new_tokens} new tokens")
    print(f"{'prompt':>6} {'variant':<30} {'':>7} | {first:>27} | {second:>27} | {f'{first} / {second}':>18}")
    out = {}
    with torch.inference_mode():
        for plen in prompt_lens:
            prompt = torch.randint(0, vocab_size, (1, plen), generator=gen)
            per = {(v, a): [] for v in models for a in settings}
            for r in range(rounds + 1):  # round 0 warms up
                for v, a in round_order(per, r):
                    settings[a](models[v])
                    t = time_hf(models[v], prompt if r else prompt[:, :4], new_tokens if r else 3)
                    if r:
                        per[v, a].append(t)
            for v in models:
                for key, name in (("ms_per_token", "decode"), ("prefill_ms", "prefill")):
                    xs, ys = ([t[key] for t in per[v, a]] for a in (first, second))
                    ratio = [a / b for a, b in zip(xs, ys, strict=True)]
                    print(f"{plen:>6} {v:<30} {name:>7} | {_summ(xs)} | {_summ(ys)} |"
                          f" {statistics.median(ratio):5.2f} [{min(ratio):4.2f}, {max(ratio):4.2f}]", flush=True)
            out.update({(plen, *key): ts for key, ts in per.items()})
    return out


def _summ(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.2f} [{min(xs):7.2f}, {max(xs):7.2f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse_kernels.bench.hf_generate", description=__doc__.split("\n")[0])
    p.add_argument("--hf-config", help="an HF config.json of a Llama-architecture model (default: TinyLlama-1.1B)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the config's; TinyLlama 22)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-len", type=int, nargs="+", default=[16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                   choices=list(VARIANTS))
    p.add_argument("--no-compact", action="store_true", help="time HF generate() only")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="the models' weights and activations")
    p.add_argument("--attention", default="upcast", choices=list(ATTENTION), help=ATTENTION_HELP)
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2")
    shape = LlamaShape.from_hf_config(args.hf_config) if args.hf_config else LlamaShape()
    if args.layers:
        shape = LlamaShape(**{**shape.__dict__, "num_hidden_layers": args.layers})
    variants = ["dense"] + [v for v in args.variants if v != "dense"]
    kinds = ["hf"] + ([] if args.no_compact else ["compact"])
    mach = machine_summary(torch.device("cpu"))
    print(f"# HF generate() vs compact Llama on {mach['device']} ({mach['isa']}, {mach['threads']} threads); "
          f"{args.dtype}, attention {args.attention}; {shape}", file=sys.stderr)
    models, dt = {}, DTYPES[args.dtype]
    for kind in kinds:
        for v in variants:
            t0 = time.perf_counter()
            models[kind, v] = (hf_model(shape, v, dtype=dt, attention=args.attention) if kind == "hf"
                               else build(shape, v, "cpu", dtype=dt, attention=args.attention))
            print(f"#   built {kind} {v} in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    timers = {"hf": time_hf, "compact": time_compact}
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for plen in args.prompt_len:
            prompt = torch.randint(0, shape.vocab_size, (1, plen), generator=gen)
            for (kind, _), m in models.items():  # warm-up
                timers[kind](m, prompt[:, :4], 3)
            runs = {key: [] for key in models}
            for r in range(args.rounds):
                for key, m in models.items():
                    runs[key].append(timers[key[0]](m, prompt, args.new_tokens))
                print(f"#   prompt {plen} round {r + 1}/{args.rounds}: "
                      + ", ".join(f"{k}/{v} {runs[k, v][-1]['ms_per_token']:.1f}" for k, v in models),
                      file=sys.stderr, flush=True)
            print(f"\n## prompt {plen}, {args.new_tokens} new tokens, {shape.num_hidden_layers} layers, {args.dtype}, "
                  f"attention {args.attention}; "
                  f"median [min, max] of {args.rounds} interleaved rounds")
            print(f"{'model':>8} {'variant':<30}| {'decode ms/token':>24} | {'x dense':>24} |"
                  f" {'prefill ms':>24} | {'x dense':>24} | {'HF/compact':>24}")
            ratios = {}
            for (kind, v), rs in runs.items():
                dense = runs[kind, "dense"]
                dec = [d["ms_per_token"] / x["ms_per_token"] for d, x in zip(dense, rs, strict=True)]
                pre = [d["prefill_ms"] / x["prefill_ms"] for d, x in zip(dense, rs, strict=True)]
                ratios[kind, v] = dec
                rel = ""
                if kind == "compact":
                    q = [h / c for h, c in zip(ratios["hf", v], dec, strict=True)]
                    rel = _summ(q)
                print(f"{kind:>8} {v:<30}| {_summ([x['ms_per_token'] for x in rs])} | {_summ(dec)} |"
                      f" {_summ([x['prefill_ms'] for x in rs])} | {_summ(pre)} | {rel:>24}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
