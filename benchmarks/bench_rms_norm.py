"""RMSNorm on the CPU: Hugging Face's ``LlamaRMSNorm`` (~9 torch ops) against
:class:`qsparse_kernels.nn.RMSNorm` (one kernel call, csrc/cpu/rms_norm.cpp), same weight and input.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_rms_norm.py [--dtype bf16 fp16 fp32] [--rounds 7]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_rms_norm.py --hf [--prompt-len 16 128] [--rounds 5]

Width 2048 (TinyLlama-1.1B), rows 1 (decode), 16 and 128 (prefill), inference mode. The modules
interleaved round-robin over ``--rounds`` rounds of bursts; each row: median us per call [min, max]
of the rounds, and HF's time over the library's (median of per-round ratios [min, max]).

``--hf``: end to end instead. Hugging Face ``LlamaForCausalLM.generate()`` with TinyLlama-1.1B
shapes in bf16 (random weights), dense and converted (``--variants``), each model decoding with
HF's norms and with the library's (:func:`qsparse_kernels.convert.use_fast_norm`) in turn, every
(model, norm) pair once per round, interleaved: decode ms/token, median [min, max].
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import qsparse_kernels as qk
from qsparse_kernels.bench.harness import interleaved_bursts
from qsparse_kernels.bench.hf_generate import add_ab_args
from qsparse_kernels.convert import use_fast_norm
from qsparse_kernels.nn import RMSNorm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROWS = [1, 16, 128]
WIDTH = 2048


def cell(ts: list[float]) -> str:
    return f"{statistics.median(ts):8.2f} [{min(ts):7.2f}, {max(ts):7.2f}]"


def hf_norms(model) -> None:
    """The model's norms back to HF's classes (the library's RMSNorm made by convert / use_fast_norm)."""
    qk.unconvert(model, filter_fn=lambda m, name: type(m) is RMSNorm)


def hf_end_to_end(variants: list[str], prompt_lens: list[int], new_tokens: int, rounds: int) -> None:
    from qsparse_kernels.bench.hf_generate import hf_model, settings_ab
    from qsparse_kernels.bench.llama import LlamaShape

    shape = LlamaShape()
    models = {v: hf_model(shape, v) for v in variants}
    settings_ab(models, {"hf": hf_norms, "fast": use_fast_norm}, prompt_lens, new_tokens, rounds, shape.vocab_size,
                "HF generate(), TinyLlama-1.1B shapes, bf16, HF's LlamaRMSNorm / qsparse_kernels.nn.RMSNorm")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16", "fp32"])
    ap.add_argument("--rounds", type=int, default=7)
    add_ab_args(ap)
    args = ap.parse_args(argv)
    if args.hf:
        return hf_end_to_end(args.variants, args.prompt_len, args.new_tokens, args.rounds)
    gen = torch.Generator().manual_seed(0)
    print(f"# RMSNorm, width {WIDTH}, {torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds "
          "[min, max]")
    print(f"{'dtype':>5} {'rows':>5} | {'HF LlamaRMSNorm us':>24} | {'qk.nn.RMSNorm us':>24} | {'HF / ours':>18}")
    for name in args.dtype:
        dt = DTYPES[name]
        hf = LlamaRMSNorm(WIDTH, eps=1e-5).to(dt)
        with torch.no_grad():
            hf.weight.copy_(1 + 0.1 * torch.randn(WIDTH, generator=gen))
        ours = RMSNorm.from_module(hf)
        for rows in ROWS:
            x = torch.randn(1, rows, WIDTH, generator=gen).to(dt)
            fns = {"hf": lambda x=x, m=hf: m(x), "ours": lambda x=x, m=ours: m(x)}
            with torch.inference_mode():
                per = interleaved_bursts(fns, args.rounds, max(20, 2000 // rows))
            ratio = [a / b for a, b in zip(per["hf"], per["ours"], strict=True)]
            print(f"{name:>5} {rows:>5} | {cell(per['hf'])} | {cell(per['ours'])} |"
                  f" {statistics.median(ratio):5.2f} [{min(ratio):4.2f}, {max(ratio):4.2f}]", flush=True)


if __name__ == "__main__":
    main()
