"""pytest-benchmark suite over the kernels: ``pytest benchmarks/ --benchmark-only``.

Shapes come from ``QSPARSE_BENCH_SHAPE`` ("IN x OUT", default the Llama-2-7B up projection
4096x11008); CI smoke-runs the suite with a tiny shape and ``--benchmark-disable``.
Compare commits with ``--benchmark-save=NAME`` / ``--benchmark-compare``.
"""

import os

import pytest
import torch


@pytest.fixture(scope="session")
def shape():
    in_f, out_f = (int(v) for v in os.environ.get("QSPARSE_BENCH_SHAPE", "4096x11008").lower().split("x"))
    return in_f, out_f


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
