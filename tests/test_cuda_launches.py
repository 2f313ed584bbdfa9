"""One kernel launch per ``sparse_linear`` / ``ternary_linear`` call (issue 18), counted by the SIMT
emulator of ``tests/cuda_emu`` (every grid it runs is one launch): the top-K selection and int8
quantization run in the GEMV's prologue and the split-K partials are reduced inside the same
launch. Each call is also checked against the reference, and calls follow each other on the same
zeroed scratch (counters, int32 accumulator), which each launch must leave zero again.
"""

import pytest
import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from tests.cuda_emu import ops as emu_ops
from tests.cuda_emu.build import load
from tests.numerics import assert_parity

# (in, out): odd, one tile and many splits, several tiles; TinyLlama's k/v projection width.
SHAPES = [(7, 63), (300, 70), (1000, 4100), (2048, 256)]


@pytest.fixture(scope="module")
def ops():
    emu_ops.library()
    load().set_sm_count(132)
    return torch.ops.qsparse_cuda_emu


def launches(fn):
    before = load().launch_count()
    out = fn()
    return load().launch_count() - before, out


@pytest.mark.parametrize("d,out_f", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_sparse_linear_one_launch(ops, d, out_f, M):
    x = torch.randn(M, d).to(torch.bfloat16)
    w = (torch.randn(out_f, d) * d**-0.5).to(torch.bfloat16)
    b = torch.randn(out_f).to(torch.bfloat16)
    wd = qk.to_fast_layout(w)
    for k in sorted({0, 1, d // 2, d}):
        n, y = launches(lambda k=k: ops.sparse_linear_kernel(x, wd, k, b))
        assert n == 1, (d, out_f, M, k, n)
        xs = R.topk_sparsify(x, k)
        assert_parity(y, F.linear(xs.double(), w.double(), b.double()), F.linear(xs, w, b))


@pytest.mark.parametrize("d,out_f", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_ternary_linear_one_launch(ops, d, out_f, M):
    packed = R.pack_ternary(torch.randint(-1, 2, (out_f, d), dtype=torch.int8))
    scale = torch.tensor(0.031)
    b = torch.randn(out_f).to(torch.bfloat16)
    for k in [None, *sorted({0, 1, d // 2, d})]:
        x = torch.randn(M, d).to(torch.bfloat16)  # fresh rows each call: a stale accumulator would show
        n, y = launches(lambda k=k, x=x: ops.ternary_linear_kernel(x, packed, scale, out_f, k, b))
        assert n == 1, (d, out_f, M, k, n)
        assert torch.equal(y, R.ternary_linear(x, packed, scale, out_f, k, b)), (d, out_f, M, k)


def test_topk_one_launch(ops):
    x = torch.randn(5, 300)
    n, y = launches(lambda: ops.topk_sparsify_kernel(x, 37))
    assert n == 1 and torch.equal(y, R.topk_sparsify(x, 37))
