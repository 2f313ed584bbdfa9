"""Attention on the CPU: torch's SDPA in bf16 / fp16 against :func:`qsparse_kernels.attention.sdpa`
(the library's kernel, csrc/cpu/attention.cpp) and against the inputs cast to float32, torch's
SDPA, the result cast back (the library's path for prefill before stop 39), one decoder layer's worth.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_attention.py [--dtype bf16 fp16] [--rounds 7]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_attention.py --hf [--prompt-len 16 128] [--rounds 3]

TinyLlama-1.1B heads (32 query, 4 key-value, head dim 64), batch 1. Decode: one query over L
cached keys (L = prompt + tokens so far); prefill: T causal queries. Variants interleaved
round-robin over ``--rounds`` rounds of bursts; each row: median us per call [min, max] of the
rounds, and torch's time and the cast path's over the library's (median of per-round ratios [min, max]).

``--hf``: end to end instead. Hugging Face ``LlamaForCausalLM.generate()`` with TinyLlama-1.1B
shapes in bf16 (random weights), dense and converted (``--variants``), each model generating with
the baseline (``--hf-baseline``: transformers' ``sdpa``, or ``cast``: the library's attention with
its kernel switched off) and with :func:`qsparse_kernels.attention.use_cpu_attention` in turn, every
(model, attention) pair once per round, interleaved: decode ms/token and prefill ms, median [min, max].
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from qsparse_kernels import attention
from qsparse_kernels.attention import sdpa
from qsparse_kernels.bench.harness import interleaved_bursts
from qsparse_kernels.bench.hf_generate import add_ab_args

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (queries, keys): decode at a few context lengths, then prefill
SHAPES = [(1, 17), (1, 144), (1, 512), (1, 2048), (16, 16), (128, 128), (512, 512)]


def cell(ts: list[float]) -> str:
    return f"{statistics.median(ts):8.1f} [{min(ts):7.1f}, {max(ts):7.1f}]"


def hf_end_to_end(variants: list[str], prompt_lens: list[int], new_tokens: int, rounds: int, baseline: str) -> None:
    from qsparse_kernels.bench.hf_generate import hf_model, settings_ab
    from qsparse_kernels.bench.llama import LlamaShape

    shape = LlamaShape()
    models = {v: hf_model(shape, v, attention="sdpa") for v in variants}
    upcast = attention.register()

    def use(impl: str, kernel: bool):
        def setup(m):
            m.set_attn_implementation(impl)
            attention._KERNEL = kernel and attention._native.loaded()

        return setup

    base = use("sdpa", True) if baseline == "sdpa" else use(upcast, False)
    settings = {baseline: base, "upcast": use(upcast, True)}
    settings_ab(models, settings, prompt_lens, new_tokens, rounds, shape.vocab_size,
                f"HF generate(), TinyLlama-1.1B shapes, bf16, {baseline} / qk.attention")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=7)
    add_ab_args(ap)
    ap.add_argument("--hf-baseline", choices=["sdpa", "cast"], default="sdpa",
                    help="--hf's baseline: transformers' SDPA, or qk.attention with its kernel off")
    args = ap.parse_args(argv)
    if args.hf:
        return hf_end_to_end(args.variants, args.prompt_len, args.new_tokens, args.rounds, args.hf_baseline)
    gen = torch.Generator().manual_seed(0)
    print(f"# attention, 32 / 4 heads of 64, batch 1, {torch.get_num_threads()} threads; median of {args.rounds} "
          "interleaved rounds [min, max]; cast = the inputs cast to float32, torch's SDPA, the result cast back "
          "(qk.attention.sdpa's path before its kernel)")
    print(f"{'dtype':>5} {'T':>4} {'L':>5} | {'torch SDPA us':>24} | {'cast us':>24} | {'qk.attention.sdpa us':>24} |"
          f" {'torch / ours':>18} | {'cast / ours':>18}")
    for name in args.dtype:
        dt = DTYPES[name]
        for T, L in SHAPES:
            q = torch.randn(1, 32, T, 64, generator=gen).to(dt)
            k, v = (torch.randn(1, 4, L, 64, generator=gen).to(dt) for _ in range(2))
            causal = T > 1
            fns = {"torch": lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c,
                                                                                             enable_gqa=True),
                   "cast": lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(
                       q.float(), k.float(), v.float(), is_causal=c, enable_gqa=True).to(q.dtype),
                   "ours": lambda q=q, k=k, v=v, c=causal: sdpa(q, k, v, is_causal=c, enable_gqa=True)}
            calls = max(3, min(300, 200_000 // (T * L)))
            with torch.inference_mode():
                per = interleaved_bursts(fns, args.rounds, calls)
            ratios = [[a / b for a, b in zip(per[x], per["ours"], strict=True)] for x in ("torch", "cast")]
            print(f"{name:>5} {T:>4} {L:>5} | {cell(per['torch'])} | {cell(per['cast'])} | {cell(per['ours'])} |"
                  + " |".join(f" {statistics.median(r):5.2f} [{min(r):4.2f}, {max(r):4.2f}]" for r in ratios),
                  flush=True)

if __name__ == "__main__":
    main()
