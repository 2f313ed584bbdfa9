"""The ``cuda`` backend (csrc/cuda) against the reference. Runs only where a CUDA GPU is visible
(skipped here with that reason); `benchmarks/gpu_check.sh` runs it on the GPU machine."""

import pytest
import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from tests.numerics import FLOAT_DTYPES, assert_parity, check_topk_invariants, distinct_magnitudes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")
DEV = "cuda"
SIZES = [1, 7, 63, 4097]


def _k_values(d):
    return sorted({0, 1, d // 2, d})


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_topk_distinct_equals_reference(dtype, d, M):
    x = distinct_magnitudes(M, d, dtype)
    for k in _k_values(d):
        y = qk.topk_sparsify(x.to(DEV), k, backend="cuda")
        assert torch.equal(y.cpu(), R.topk_sparsify(x, k)), (d, M, k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_topk_ties_nan_inf_invariants(dtype):
    x = torch.randint(1, 4, (9, 300)).to(dtype) * (torch.randint(0, 2, (9, 300)) * 2 - 1)
    x[1, 5], x[2, 7], x[2, 8] = float("nan"), float("inf"), -float("inf")
    for k in (1, 2, 3, 150, 299):
        check_topk_invariants(x, qk.topk_sparsify(x.to(DEV), k, backend="cuda").cpu(), k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_block_topk(dtype):
    x = distinct_magnitudes(5, 96, dtype)
    for n, m in [(16, 32), (1, 8), (0, 4), (4, 4)]:
        y = qk.block_topk_sparsify(x.to(DEV), n, m, backend="cuda")
        assert torch.equal(y.cpu(), R.block_topk_sparsify(x, n, m))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d,out_f", [(1, 1), (7, 63), (63, 7), (4097, 130), (256, 4097)])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("layout", ["colmajor", "rowmajor"])
def test_sparse_linear(dtype, d, out_f, M, layout):
    x = torch.randn(M, d).to(dtype)
    w = torch.randn(out_f, d).to(dtype) * d**-0.5
    b = torch.randn(out_f).to(dtype)
    wd = qk.to_fast_layout(w.to(DEV)) if layout == "colmajor" else w.to(DEV)
    for k in _k_values(d):
        y = qk.sparse_linear(x.to(DEV), wd, k, b.to(DEV), backend="cuda").cpu()
        xs = R.topk_sparsify(x, k)
        ref64 = F.linear(xs.double(), w.double(), b.double())
        assert_parity(y, ref64, F.linear(xs, w, b))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d,out_f", [(1, 1), (7, 63), (63, 7), (4097, 130), (256, 4097), (64, 64)])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_ternary_linear_exact(dtype, d, out_f, M):
    x = torch.randn(M, d).to(dtype)
    t = torch.randint(-1, 2, (out_f, d), dtype=torch.int8)
    packed = R.pack_ternary(t)
    scale = torch.tensor(0.0123)
    b = torch.randn(out_f).to(dtype)
    for k in [None, *_k_values(d)]:
        y = qk.ternary_linear(x.to(DEV), packed.to(DEV), scale.to(DEV), out_f, k, b.to(DEV), backend="cuda").cpu()
        ref = R.ternary_linear(x, packed, scale, out_f, k, b)
        assert torch.equal(y, ref), (d, out_f, M, k)  # int32 accumulator exact, same epilogue order


def test_ternary_nonfinite_rows():
    x = torch.randn(3, 64)
    x[0, 3], x[1, 9] = float("nan"), float("inf")
    packed = R.pack_ternary(torch.randint(-1, 2, (40, 64), dtype=torch.int8))
    y = qk.ternary_linear(x.to(DEV), packed.to(DEV), torch.tensor(1.0, device=DEV), 40, backend="cuda").cpu()
    assert torch.isnan(y[:2]).all() and torch.isfinite(y[2]).all()


def test_deterministic():
    x = torch.randn(3, 4096, device=DEV, dtype=torch.bfloat16)
    w = qk.to_fast_layout(torch.randn(11008, 4096, device=DEV, dtype=torch.bfloat16))
    a = [qk.sparse_linear(x, w, 2048, backend="cuda") for _ in range(3)]
    assert all(torch.equal(a[0], b) for b in a[1:])


def test_kernel_checks():
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.qsparse.topk_sparsify_kernel(torch.randn(2, 8, device=DEV), 9)
    with pytest.raises(RuntimeError, match="packed must be"):
        torch.ops.qsparse.ternary_linear_kernel(torch.randn(2, 8, device=DEV), torch.zeros(8, 3, dtype=torch.uint8,
                                                device=DEV), torch.ones((), device=DEV), 8, None, None)
