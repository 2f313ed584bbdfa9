"""The nn modules against nn.Linear on the CPU: Block Q-Sparse forward and Q-Sparse training steps.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_modules.py

Two tables, each a ratio against ``nn.Linear`` with the same weights and dtype in the same run
(calls interleaved, weights rotated over >= 128 MB so each call reads DRAM):

* Block Q-Sparse ``QSparseLinear(block=(16, 32))`` forward, 4096 -> 11008, bf16 and fp16, M = 1, 4.
* A training step, forward + backward of ``QSparseLinear(sparsity=0.5)``, 2048 -> 5632, bf16,
  M = 64, gradients set to None before each step (as ``optimizer.zero_grad()`` does).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.bench_cpu_sparse import _fmt, time_interleaved
from qsparse_kernels.bench.harness import copies_needed
from qsparse_kernels.nn import QSparseLinear

CPU = torch.device("cpu")


def _pairs(in_f: int, out_f: int, dtype, make):
    """Rotated (nn.Linear, module) pairs sharing the initial weights, >= 128 MB of each kind."""
    n = copies_needed(in_f * out_f * torch.finfo(dtype).bits // 8, CPU)
    pairs = []
    for _ in range(n):
        lin = nn.Linear(in_f, out_f, bias=False).to(dtype)
        twin = nn.Linear(in_f, out_f, bias=False).to(dtype)
        twin.load_state_dict(lin.state_dict())
        pairs.append((lin, make(twin)))
    return pairs


def block_forward(reps: int) -> None:
    print("# Block Q-Sparse 16:32 forward, 4096 -> 11008; us: median [p20, p80]")
    print(f"{'dtype':>9} {'M':>3} | {'nn.Linear':>23} | {'QSparseLinear(block)':>23} | speedup")
    for dtype in (torch.bfloat16, torch.float16):
        pairs = _pairs(4096, 11008, dtype, lambda lin: QSparseLinear.from_linear(lin, block=(16, 32)))
        for M in (1, 4):
            xs = [torch.randn(M, 4096, dtype=dtype) for _ in range(7)]
            with torch.inference_mode():
                t = time_interleaved(
                    {
                        "dense": lambda i, p=pairs, xs=xs: p[i % len(p)][0](xs[i % 7]),
                        "block": lambda i, p=pairs, xs=xs: p[i % len(p)][1](xs[i % 7]),
                    },
                    reps,
                )
            print(f"{str(dtype)[6:]:>9} {M:>3} | {_fmt(t['dense'])} | {_fmt(t['block'])} |"
                  f" {t['dense'].p50 / t['block'].p50:6.2f}x", flush=True)


def training_step(reps: int) -> None:
    print("# training step (forward + backward), 2048 -> 5632, bf16, M = 64; us: median [p20, p80]")
    pairs = _pairs(2048, 5632, torch.bfloat16, lambda lin: QSparseLinear.from_linear(lin, sparsity=0.5))
    x = torch.randn(64, 2048, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(64, 5632, dtype=torch.bfloat16)

    def step(module):
        module.weight.grad = None
        x.grad = None
        module(x).backward(g)

    t = time_interleaved(
        {"dense": lambda i: step(pairs[i % len(pairs)][0]), "qsparse": lambda i: step(pairs[i % len(pairs)][1])},
        reps,
    )
    print(f"nn.Linear {_fmt(t['dense'])} | QSparseLinear(0.5) {_fmt(t['qsparse'])} |"
          f" {t['dense'].p50 / t['qsparse'].p50:.2f}x of nn.Linear's speed")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    block_forward(args.reps)
    training_step(args.reps)


if __name__ == "__main__":
    main()
