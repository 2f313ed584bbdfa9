"""Per-call cost of a converted layer against ``nn.Linear`` at a tiny shape (64 -> 64, M = 1).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_per_call.py [--dtype bf16] [--rounds 7]

At 64 -> 64 the weight is 8 KB and stays in L1: the time is what a call costs outside the
memory-bound work (Python module and op wrapper, argument checks, backend selection, the
dispatcher, allocation, threading). Variants, each the same weights as the ``nn.Linear``:

* ``QSparseLinear`` (s = 0.5), packed ``BitLinear`` (dense activations and s = 0.6125), and
  their raw ops (``qsparse_kernels.sparse_linear`` / ``ternary_linear``) for the wrapper's share;
* a fused q/k/v ``SiblingGroup`` of three ``QSparseLinear`` (one top-K, one kernel call) against
  three ``nn.Linear`` calls.

Calls run in bursts of ``--calls`` (one burst timed as a whole, divided), variants interleaved
round-robin, ``--rounds`` rounds; each row gives the median us per call with its min-max over the
rounds, and the ratio to ``nn.Linear`` as the median of per-round ratios with their min-max.
The target (issue 16) is <= 1.5x for the single layers.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import qsparse_kernels as qk
from qsparse_kernels.bench.harness import interleaved_bursts
from qsparse_kernels.nn import BitLinear, QSparseLinear
from qsparse_kernels.nn._siblings import SiblingGroup

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def variants(d: int, dtype: torch.dtype) -> dict:
    """name -> zero-argument call."""
    lins = [nn.Linear(d, d, bias=False).to(dtype) for _ in range(3)]
    lin = lins[0]
    x = torch.randn(1, d, dtype=dtype)
    qs = QSparseLinear.from_linear(nn.Linear(d, d, bias=False).to(dtype).requires_grad_(False), sparsity=0.5)
    qs.weight.data.copy_(lin.weight)
    bl = BitLinear.from_linear(lin, sparsity=0.6125).pack().requires_grad_(False)
    bl0 = BitLinear.from_linear(lin).pack().requires_grad_(False)
    trio = []
    for m in lins:
        q = QSparseLinear.from_linear(nn.Linear(d, d, bias=False).to(dtype), sparsity=0.5)
        q.weight.data.copy_(m.weight)
        trio.append(q.requires_grad_(False))
    SiblingGroup(trio)
    for m in (*lins, qs, bl, bl0, *trio):
        m.eval()  # inference, as a served model (a SiblingGroup never fuses in training mode)
    k = qk.sparsity_to_k(d, 0.5)
    kb = qk.sparsity_to_k(d, 0.6125)
    return {
        "nn.Linear": lambda: lin(x),
        "QSparseLinear s=0.5": lambda: qs(x),
        "  op sparse_linear": lambda: qk.sparse_linear(x, qs.weight, k),
        "BitLinear packed s=0": lambda: bl0(x),
        "BitLinear packed s=0.6125": lambda: bl(x),
        "  op ternary_linear": lambda: qk.ternary_linear(x, bl.packed, bl.scale, d, kb),
        "3x nn.Linear (q/k/v)": lambda: [m(x) for m in lins],
        "fused q/k/v QSparseLinear": lambda: [m(x) for m in trio],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--d", type=int, default=64, help="in = out features (default 64)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed burst")
    args = ap.parse_args(argv)
    fns = variants(args.d, DTYPES[args.dtype])
    with torch.inference_mode():
        per = interleaved_bursts(fns, args.rounds, args.calls)
    base = per["nn.Linear"]
    print(f"# per-call cost, {args.d} -> {args.d}, {args.dtype}, M = 1, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} interleaved rounds of {args.calls} calls [min, max]")
    print(f"{'variant':>27} | {'us / call':>22} | {'x nn.Linear':>20}")
    for name, ts in per.items():
        ref = [3 * b for b in base] if name.startswith(("3x", "fused")) else base
        ratios = [t / b for t, b in zip(ts, ref, strict=True)]
        print(f"{name:>27} | {statistics.median(ts):7.1f} [{min(ts):5.1f}, {max(ts):5.1f}] |"
              f" {statistics.median(ratios):5.2f} [{min(ratios):4.2f}, {max(ratios):4.2f}]")
    print("(the fused q/k/v rows are per three projections, against three nn.Linear calls)")


if __name__ == "__main__":
    main()
