"""Attention on the CPU: torch's SDPA in bf16 / fp16 against :func:`qsparse_kernels.attention.sdpa`
(the same inputs attended in float32, the result cast back), one decoder layer's worth.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_attention.py [--dtype bf16 fp16] [--rounds 7]

TinyLlama-1.1B heads (32 query, 4 key-value, head dim 64), batch 1. Decode: one query over L
cached keys (L = prompt + tokens so far); prefill: T causal queries. Variants interleaved
round-robin over ``--rounds`` rounds of bursts; each row: median us per call [min, max] of the
rounds, and torch's time over the float32 path's (median of per-round ratios [min, max]).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qsparse_kernels.attention import sdpa
from qsparse_kernels.bench.harness import round_order

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (queries, keys): decode at a few context lengths, then prefill
SHAPES = [(1, 17), (1, 144), (1, 512), (1, 2048), (16, 16), (128, 128)]


def measure(fns: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    per = {name: [] for name in fns}
    for r in range(rounds + 1):  # round 0 warms up
        for name in round_order(fns, r):
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            if r:
                per[name].append((time.perf_counter() - t0) / calls * 1e6)
    return per


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    print(f"# attention, 32 / 4 heads of 64, batch 1, {torch.get_num_threads()} threads; median of {args.rounds} "
          "interleaved rounds [min, max]")
    print(f"{'dtype':>5} {'T':>4} {'L':>5} | {'torch SDPA us':>24} | {'float32 path us':>24} | {'torch / ours':>18}")
    for name in args.dtype:
        dt = DTYPES[name]
        for T, L in SHAPES:
            q = torch.randn(1, 32, T, 64, generator=gen).to(dt)
            k, v = (torch.randn(1, 4, L, 64, generator=gen).to(dt) for _ in range(2))
            causal = T > 1
            fns = {"torch": lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c,
                                                                                             enable_gqa=True),
                   "ours": lambda q=q, k=k, v=v, c=causal: sdpa(q, k, v, is_causal=c, enable_gqa=True)}
            calls = max(3, min(300, 200_000 // (T * L)))
            with torch.inference_mode():
                per = measure(fns, args.rounds, calls)
            ratio = [a / b for a, b in zip(per["torch"], per["ours"], strict=True)]

            def cell(ts):
                return f"{statistics.median(ts):8.1f} [{min(ts):7.1f}, {max(ts):7.1f}]"

            print(f"{name:>5} {T:>4} {L:>5} | {cell(per['torch'])} | {cell(per['ours'])} |"
                  f" {statistics.median(ratio):5.2f} [{min(ratio):4.2f}, {max(ratio):4.2f}]", flush=True)


if __name__ == "__main__":
    main()
