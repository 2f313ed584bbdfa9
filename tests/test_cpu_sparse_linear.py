"""The cpu backend's sparse_linear (csrc/cpu/sparse_linear.cpp, sparse_gemv_avx512.cpp) vs float64.

Parity per SPEC "Numerics" on inputs without ties (so the kept set is unique), every ISA path and
dtype, odd sizes, every batch path (one row, blocks of rows, the dense path above the crossover),
column-major / row-major / sliced weights, NaN and Inf rows, determinism, opcheck.
"""

import pytest
import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import _native
from qsparse_kernels import reference as R
from tests.cpu_flags import CPU_FLAGS
from tests.numerics import FLOAT_DTYPES, assert_elementwise_bound, assert_parity, distinct_magnitudes

pytestmark = pytest.mark.skipif(not qk.backend_info()["cpu"]["usable"], reason="cpu backend not built")

ISAS = ["scalar", "avx2", "avx512"]


@pytest.fixture(params=ISAS)
def isa(request):
    _native._C.set_cpu_isa_cap(request.param)
    request.addfinalizer(lambda: _native._C.set_cpu_isa_cap(""))
    return request.param


def _x(lead, d, dtype, gen):
    n = 1
    for s in lead:
        n *= s
    return distinct_magnitudes(n, d, dtype, gen).reshape(*lead, d)


def _weight(out_f, in_f, dtype, layout, gen):
    """Logical [out_f, in_f] weight in the given storage layout (values random, never all-zero)."""
    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
    if layout == "col":
        return w.t().contiguous().t()
    if layout == "row":
        return w
    if layout == "col_sliced":  # stride(0) == 1, leading dimension > out_f, every other input feature
        big = torch.randn(2 * in_f, out_f + 5, generator=gen).to(dtype).t()  # [out_f + 5, 2 in_f], column-major
        big[:out_f, ::2] = w
        return big[:out_f, ::2]
    if layout == "row_sliced":
        big = torch.randn(out_f, in_f + 3, generator=gen).to(dtype)
        big[:, 1 : in_f + 1] = w
        return big[:, 1 : in_f + 1]
    raise AssertionError(layout)


def _check(x, w, k, b):
    y = qk.sparse_linear(x, w, k, b, backend="cpu")
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    xs = R.topk_sparsify(x, k)
    ref64 = F.linear(xs.double(), w.double(), None if b is None else b.double())
    if ref64.numel() == 0:
        return
    if k == 0 and b is None:
        assert (y == 0).all() and not torch.signbit(y).any()
        return
    assert_parity(y, ref64, F.linear(xs, w, b))
    assert_elementwise_bound(y, xs, w, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("in_f,out_f", [(1, 1), (7, 63), (63, 7), (64, 257), (4097, 63), (63, 4097)])
def test_parity_sizes(isa, dtype, in_f, out_f, gen):
    w = _weight(out_f, in_f, dtype, "col", gen)
    b = torch.randn(out_f, generator=gen).to(dtype)
    for m in (1, 3):
        x = _x((m,), in_f, dtype, gen)
        for k in sorted({0, 1, in_f // 2, in_f}):
            _check(x, w, k, b if k % 2 else None)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "lead",
    [(0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,)]
    + [(9,), (10,), (11,), (13,), (14,), (15,), (16,), (17,), (70,), (2, 2), (2, 3)],
)
def test_parity_batch(isa, dtype, lead, gen):
    """M = 1 (one row), one block of up to 16 rows sharing the union of kept rows (fp32 and fp16
    M <= 16: every block size, 9-16 rows being an 8-row and a 1-8-row half of the FMA block; fp16
    also 17 and 70 where torch's fp16 GEMM is slow: blocks of 8 + 9 and 5 x 14), the dense path
    above that (bf16 from 9 rows under these caps, which turn AMX off; fp32 17, 70), 3-D input."""
    in_f, out_f = 300, 1100
    w = _weight(out_f, in_f, dtype, "col", gen)
    b = torch.randn(out_f, generator=gen).to(dtype)
    x = _x(lead, in_f, dtype, gen)
    for k in (0, 1, 150, 300):
        _check(x, w, k, b)
        _check(x, w, k, None)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["col", "row", "col_sliced", "row_sliced"])
def test_parity_layouts(isa, dtype, layout, gen):
    in_f, out_f = 129, 77
    w = _weight(out_f, in_f, dtype, layout, gen)
    b = torch.randn(out_f, generator=gen).to(dtype)
    for lead in ((1,), (4,), (2, 9)):
        x = _x(lead, in_f, dtype, gen)
        for k in (1, 64, 129):
            _check(x, w, k, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_rows(isa, dtype, gen):
    """A kept NaN or Inf reaches the output exactly as in the reference; other rows stay finite."""
    in_f, out_f = 200, 300
    w = _weight(out_f, in_f, dtype, "col", gen)
    for m in (1, 4):
        x = _x((m,), in_f, dtype, gen)
        x[0, 17] = float("nan")
        if m > 1:
            x[1, 3] = -float("inf")
        for k in (1, 100):
            y = qk.sparse_linear(x, w, k, None, backend="cpu").float()
            ref = R.sparse_linear(x, w, k, None).float()
            assert torch.equal(torch.isnan(y), torch.isnan(ref))
            assert torch.equal(torch.isinf(y), torch.isinf(ref))
            fin = torch.isfinite(ref)
            assert torch.equal(torch.signbit(y[torch.isinf(ref)]), torch.signbit(ref[torch.isinf(ref)]))
            assert torch.isnan(y[0]).all()
            if m > 1:
                assert torch.isinf(y[1]).all()
                torch.testing.assert_close(y[fin], ref[fin], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m", [1, 3, 4])
def test_repeatable_and_thread_independent(m, gen):
    x = _x((m,), 4097, torch.bfloat16, gen)
    w = _weight(4100, 4097, torch.bfloat16, "col", gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = qk.sparse_linear(x, w, 2000, None, backend="cpu")
        torch.set_num_threads(2)
        b = qk.sparse_linear(x, w, 2000, None, backend="cpu")
        c = qk.sparse_linear(x, w, 2000, None, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(dtype, gen):
    x = torch.randn(2, 64, generator=gen).to(dtype)
    b = torch.randn(40, generator=gen).to(dtype)
    for w in (_weight(40, 64, dtype, "col", gen), _weight(40, 64, dtype, "row", gen)):
        torch.library.opcheck(torch.ops.qsparse.sparse_linear_kernel, (x, w, 20, b))
        torch.library.opcheck(torch.ops.qsparse.sparse_linear_kernel, (x, w, 0, None))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kernel_takes_any_leading_dims_and_strides(dtype):
    # The cpu backend passes the public op's x straight to the kernel: [..., d], any strides.
    op = torch.ops.qsparse.sparse_linear_kernel
    w = qk.to_fast_layout(torch.randn(9, 33, dtype=dtype))
    bias = torch.randn(9, dtype=dtype)
    x = torch.randn(3, 2, 33, dtype=dtype)
    want = op(x.reshape(6, 33), w, 7, bias).reshape(3, 2, 9)
    assert torch.equal(op(x, w, 7, bias), want)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not xt.is_contiguous()
    assert torch.equal(op(xt, w, 7, bias), want)
    assert torch.equal(op(x[0, 0], w, 7, bias), want[0, 0])  # 1-D x -> 1-D result
    assert op(x[:0], w, 7, bias).shape == (0, 2, 9)


def test_kernel_checks_arguments():
    op = torch.ops.qsparse.sparse_linear_kernel
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="k must be in"):
        op(x, w, 9, None)
    with pytest.raises(RuntimeError, match="weight.size\\(1\\)"):
        op(x, torch.randn(5, 7), 1, None)
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        op(torch.tensor(1.0), w, 1, None)
    with pytest.raises(RuntimeError, match="weight must be"):
        op(x, w.half(), 1, None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, w, 1, torch.randn(4))
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, w, 1, torch.randn(5).double())
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(x.double(), w.double(), 1, None)


TORCH_GEMMS = {"aten::linear", "aten::mm", "aten::matmul"}


def _aten_ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_half_types_take_torch_gemm_only_where_it_is_fast(gen):
    """torch's CPU fp16 GEMM is fast only where the CPU has AVX512-FP16 and torch runs oneDNN, its
    bf16 GEMM only where the CPU has AVX512-BF16 (AMX implies it). Elsewhere they were measured
    ~100x slower than dense on a column-major weight (fp16: 3.1 s at 4096 -> 11008, M = 8; bf16
    on an AVX2 Zen 3: 0.01-0.04x of F.linear at M = 16), so those dtypes stay on the library
    kernel at every M; where torch's GEMM is fast, batches above the crossover take it on the
    masked activations (csrc/cpu/sparse_linear.cpp: sparse_max_rows)."""
    w = qk.to_fast_layout(torch.randn(40, 64, generator=gen))
    x = torch.randn(70, 64, generator=gen)
    ran = _aten_ops_run(lambda: qk.sparse_linear(x[:16].half(), w.half(), 32, backend="cpu"))
    assert "qsparse::sparse_linear_kernel" in ran and not TORCH_GEMMS & ran
    ran = _aten_ops_run(lambda: qk.sparse_linear(x.half(), w.half(), 32, backend="cpu"))
    assert "qsparse::sparse_linear_kernel" in ran
    assert bool(TORCH_GEMMS & ran) == ("avx512_fp16" in CPU_FLAGS and torch.backends.mkldnn.is_available())
    with torch.backends.mkldnn.flags(enabled=False):  # torch's own fp16 GEMM then: slow everywhere
        ran = _aten_ops_run(lambda: qk.sparse_linear(x.half(), w.half(), 32, backend="cpu"))
    assert "qsparse::sparse_linear_kernel" in ran and not TORCH_GEMMS & ran
    ran = _aten_ops_run(lambda: qk.sparse_linear(x.bfloat16(), w.bfloat16(), 32, backend="cpu"))
    assert "qsparse::sparse_linear_kernel" in ran
    assert bool(TORCH_GEMMS & ran) == ("avx512_bf16" in CPU_FLAGS and torch.backends.mkldnn.is_available())
    with torch.backends.mkldnn.flags(enabled=False):
        ran = _aten_ops_run(lambda: qk.sparse_linear(x.bfloat16(), w.bfloat16(), 32, backend="cpu"))
    assert "qsparse::sparse_linear_kernel" in ran and not TORCH_GEMMS & ran


def test_block_qsparse_reads_only_kept_rows(gen):
    """QSparseLinear(block=...) goes through sparse_linear with k = d n / m (kept rows only), not
    F.linear over the whole column-major weight."""
    from qsparse_kernels.nn import QSparseLinear

    m = QSparseLinear(64, 40, block=(2, 8), backend="cpu").half()
    x = torch.randn(3, 64, generator=gen).half()
    ran = _aten_ops_run(lambda: m(x))
    assert "qsparse::sparse_linear_kernel" in ran and not TORCH_GEMMS & ran
