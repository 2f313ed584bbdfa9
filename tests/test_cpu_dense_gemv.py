"""The cpu backend's dense GEMV over a row-major weight (csrc/cpu/dense_gemv.cpp): sparse_linear at
k = d on an nn.Linear-layout weight with at most cpu_row_gemv_max_rows rows (4, or 2 for bf16 on a CPU
with AMX-BF16, where torch's GEMM in that dtype is fast, else every row count), the path
:class:`qsparse_kernels.nn.DenseHead` takes. Parity vs float64 on odd shapes, every dtype, every
ISA path; results identical across ISA paths, thread counts and output slices (one fixed sum order);
strided (sliced) weights, bias, NaN / Inf propagation, and the rows above the limit (torch's GEMM).
"""

import pytest
import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import _native
from tests.cpu_flags import ISAS, with_isa
from tests.numerics import FLOAT_DTYPES, assert_elementwise_bound, assert_parity

pytestmark = pytest.mark.skipif(not qk.backend_info()["cpu"]["usable"], reason="cpu backend not built")



def _gemv(x, w, b=None):
    return qk.sparse_linear(x, w, w.shape[1], b, backend="cpu")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d", [1, 7, 63, 4097])
@pytest.mark.parametrize("n", [2, 63, 300])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_parity_and_same_result_on_every_isa(dtype, d, n, m, gen):
    x = torch.randn(m, d, generator=gen).to(dtype)
    w = torch.randn(n, d, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if m % 2 else None
    ys = [with_isa(isa, lambda: _gemv(x, w, b)) for isa in ISAS]
    ref64 = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert ys[0].dtype == dtype and ys[0].shape == (m, n)
    assert_parity(ys[0], ref64, F.linear(x, w, b))
    assert_elementwise_bound(ys[0], x, w, b)
    for y in ys[1:]:  # one sum order on every path (torch's GEMM above the row limit: not ours, same call)
        assert torch.equal(y, ys[0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_columns_do_not_depend_on_threads_slices_or_strides(dtype, gen):
    d, n = 1031, 700
    big = torch.randn(n + 5, 2 * d + 3, generator=gen).to(dtype)
    w = big[2 : 2 + n, 1 : 1 + d]  # row-major rows with a leading dimension > d
    assert w.stride() == (2 * d + 3, 1)
    b = torch.randn(n, generator=gen).to(dtype)
    for m in (1, 2):
        x = torch.randn(m, d, generator=gen).to(dtype)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = _gemv(x, w, b)
            torch.set_num_threads(2)
            two = _gemv(x, w, b)
        finally:
            torch.set_num_threads(old)
        assert torch.equal(one, two)
        assert torch.equal(_gemv(x, w[300:333], b[300:333]), two[:, 300:333])
        assert torch.equal(_gemv(x, w.contiguous(), b), two)
        assert_parity(two, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_inf_propagate(dtype, isa, gen):
    d, n = 70, 40
    x = torch.randn(2, d, generator=gen).to(dtype)
    w = torch.randn(n, d, generator=gen).to(dtype)
    x[0, 5] = float("nan")
    x[1, 69] = float("inf")  # in the last, partial chunk of 16
    w[3, 69] = 0.0  # inf * 0 = nan for output 3 of row 1
    y = with_isa(isa, lambda: _gemv(x, w))
    want = F.linear(x.double(), w.double())
    assert torch.isnan(y[0]).all()
    assert torch.equal(torch.isnan(y[1]), torch.isnan(want[1])) and torch.equal(torch.isinf(y[1]), torch.isinf(want[1]))
    assert torch.equal(torch.sign(y[1][torch.isinf(y[1])]), torch.sign(want[1][torch.isinf(want[1])]).to(dtype))


def test_leading_dims_and_empty(gen):
    w = torch.randn(9, 16, generator=gen)
    x = torch.randn(1, 1, 16, generator=gen)
    assert _gemv(x, w).shape == (1, 1, 9)
    assert torch.equal(_gemv(x, w)[0], _gemv(x[0], w))
    assert _gemv(torch.randn(0, 16), w).shape == (0, 9)
    assert _gemv(x, torch.randn(0, 16)).shape == (1, 1, 0)


def test_opcheck_row_major_dense(gen):
    for dtype in FLOAT_DTYPES:
        x = torch.randn(2, 33, generator=gen).to(dtype)
        w = torch.randn(17, 33, generator=gen).to(dtype)
        torch.library.opcheck(torch.ops.qsparse.sparse_linear_kernel.default, (x, w, 33, None))


def _documented_order(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dense_gemv.cpp's sum order in float32: 16 partial sums over chunks of 16 V values (V = 2 for
    bf16, else 1; zero padded), lane l taking values V l .. V l + V - 1 of each chunk in turn, then
    s[l] += s[l + h] for h = 8, 4, 2, 1. For bf16 / fp16 inputs each product is exact in float32,
    so ``s + x * w`` rounds once, like the kernels' fused multiply-add."""
    m, d = x.shape
    v = 2 if x.dtype == torch.bfloat16 else 1
    pad = (-d) % (16 * v)
    xp = F.pad(x.float(), (0, pad)).reshape(m, 1, -1, 16, v)
    wp = F.pad(w.float(), (0, pad)).reshape(1, w.shape[0], -1, 16, v)
    s = torch.zeros(m, w.shape[0], 16)
    for c in range(xp.shape[2]):
        for j in range(v):
            s = s + xp[:, :, c, :, j] * wp[:, :, c, :, j]
    for h in (8, 4, 2, 1):
        s = s[..., :h] + s[..., h : 2 * h]
    return s[..., 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # exact products (_documented_order)
@pytest.mark.parametrize("isa", ISAS)
def test_library_kernel_runs_in_its_documented_order(dtype, isa, gen):
    """Up to the row limit the result is the kernel's own (its documented float32 sum order, bit for
    bit), not torch's GEMM; above 4 rows in several passes over the weight."""
    limit = _native._C.cpu_row_gemv_max_rows(str(dtype).removeprefix("torch."))
    rows = [m for m in (1, 2, 3, 4, 5, 9) if m <= limit]
    assert rows[:2] == [1, 2]
    for d in (5, 17, 32, 47, 63, 1000):  # bf16 chunks of 32: short, a half, one, one and a half, ...
        w = torch.randn(37, d, generator=gen).to(dtype)
        b = torch.randn(37, generator=gen).to(dtype)
        for m in rows:
            x = torch.randn(m, d, generator=gen).to(dtype)
            want = (_documented_order(x, w) + b.float()).to(dtype)
            assert torch.equal(with_isa(isa, lambda x=x, w=w, b=b: _gemv(x, w, b)), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", ISAS)
def test_sum_order_shows_on_a_crafted_input(dtype, isa):
    """Random inputs rarely show a float32 summation order through the bf16 / fp16 rounding of the
    result. Here every lane l of the order adds the products 1, then 2^24, then -2^24: in that
    order 1 + 2^24 rounds to 2^24 (a tie, to even) and the lane ends at 0; the exact sum, or
    -2^24 before 2^24, gives 1. So the kernel must give 0 where the exact result is 16 (one per
    lane), on every ISA path, for each of 2 rows and any output position."""
    # lane l's values: bf16 (2 per lane per chunk of 32) 2l, then 32 + 2l and 33 + 2l; fp16 (1 per
    # lane per chunk of 16) l, 16 + l, 32 + l
    lanes = torch.arange(16)
    at = [2 * lanes, 32 + 2 * lanes, 33 + 2 * lanes] if dtype == torch.bfloat16 else [lanes, 16 + lanes, 32 + lanes]
    x, w = torch.zeros(2, 64), torch.zeros(5, 64)
    for i, (xv, wv) in zip(at, [(1.0, 1.0), (2.0**12, 2.0**12), (2.0**12, -(2.0**12))], strict=True):
        x[:, i], w[:, i] = xv, wv
    x, w = x.to(dtype), w.to(dtype)
    assert F.linear(x.double(), w.double()).eq(16).all()  # the exact result
    assert _documented_order(x, w).eq(0).all()
    assert with_isa(isa, lambda: _gemv(x, w)).eq(0).all()
