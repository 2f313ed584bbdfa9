"""The cpu backend's batched sparse_linear (csrc/cpu/sparse_gemm_bf16.cpp: AMX-BF16 and AVX512-BF16,
and the paths below them) vs float64, and the per-column invariants that fused sibling
projections rely on.

Every bf16 kernel this CPU has runs here (the ISA cap reaches each one: "amx", "avx512bf16", then
"avx512" / "avx2" / "scalar", which take the FMA kernels or torch's GEMM); fp32 and fp16 run
through the same caps. Parity per SPEC "Numerics" on inputs without ties, odd sizes, every batch
size class, sliced (odd-stride) weights, k = 0 and k = d.
"""

import pytest
import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import _native
from qsparse_kernels import reference as R
from tests.cpu_flags import CPU_FLAGS, ZEN4
from tests.numerics import FLOAT_DTYPES, assert_parity, distinct_magnitudes

pytestmark = pytest.mark.skipif(not qk.backend_info()["cpu"]["usable"], reason="cpu backend not built")


FLAGS = CPU_FLAGS
HAS = {
    "amx": {"amx_tile", "amx_bf16", "avx512_bf16"} <= FLAGS,
    "avx512bf16": {"avx512_bf16", "avx512bw"} <= FLAGS,
    "avx512": {"avx512f", "avx512bw"} <= FLAGS,
    "avx2": "avx2" in FLAGS,
    "scalar": True,
}
CAPS = ["amx", "avx512bf16", "avx512", "avx2", "scalar"]
WANT_GEMM = {"amx": "amx", "avx512bf16": "avx512bf16", "avx512": "none", "avx2": "none", "scalar": "none"}


@pytest.fixture(params=CAPS)
def cap(request):
    if not HAS[request.param]:
        pytest.skip(f"this CPU has no {request.param}")
    _native._C.set_cpu_isa_cap(request.param)
    request.addfinalizer(lambda: _native._C.set_cpu_isa_cap(""))
    # The cap really selects that kernel (the OS granting AMX included): else the test is void.
    assert _native._C.cpu_bf16_gemm() == WANT_GEMM[request.param]
    return request.param


def _col(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t()


def _check(x, w, k, b):
    y = qk.sparse_linear(x, w, k, b, backend="cpu")
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    xs = R.topk_sparsify(x, k)
    ref64 = F.linear(xs.double(), w.double(), None if b is None else b.double())
    if k == 0:
        want = torch.zeros_like(y) if b is None else b.expand_as(y)
        assert torch.equal(y, want) and not torch.signbit(y[y == 0]).any()
        return
    assert_parity(y, ref64, F.linear(xs, w, b))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("in_f,out_f", [(1, 7), (7, 63), (63, 1), (64, 65), (4097, 63), (63, 4097)])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 12, 13, 16, 17, 64, 100, 130])
def test_parity_batch_sizes(cap, dtype, in_f, out_f, m, gen):
    w = _col(torch.randn(out_f, in_f, generator=gen).to(dtype))
    b = torch.randn(out_f, generator=gen).to(dtype)
    x = distinct_magnitudes(m, in_f, dtype, gen)
    for k in sorted({0, 1, in_f // 2, in_f}):
        _check(x, w, k, b if k % 2 else None)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sliced_weight_and_3d_input(cap, dtype, gen):
    """Column-major weight with a leading dimension > out_features and every other input feature
    (stride(1) = 2 ld): the kernels read only the logical elements (an out-of-bounds read past
    the view would pick up the NaNs around it)."""
    in_f, out_f = 100, 77
    big = torch.full((2 * in_f + 1, out_f + 9), float("nan"), dtype=dtype).t()  # column-major storage
    w = big[3 : 3 + out_f, 1::2][:, :in_f]
    assert w.stride(0) == 1 and w.shape == (out_f, in_f)
    w.copy_(torch.randn(out_f, in_f, generator=gen).to(dtype))
    b = torch.randn(out_f, generator=gen).to(dtype)
    for lead in ((5,), (3, 7), (40,)):
        n = 1
        for s in lead:
            n *= s
        x = distinct_magnitudes(n, in_f, dtype, gen).reshape(*lead, in_f)
        for k in (0, 1, 37, in_f):
            _check(x, w, k, b)


def _library_kernel_runs(dtype, m: int, d: int, k: int) -> bool:
    """Whether sparse_linear on a column-major weight runs the library's own kernels at batch m
    keeping k of d features (csrc/cpu/sparse_linear.cpp: sparse_max_rows, kBf16BatchMaxRows,
    row_gemm_wins), not torch's GEMM."""
    name = str(dtype).removeprefix("torch.")
    return m <= _native._C.cpu_sparse_kernel_max_rows(name) or _native._C.cpu_sparse_row_gemm(name, m, d, k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 5, 16, 17, 64])
def test_column_results_do_not_depend_on_out_features(cap, dtype, m, gen):
    """Fused siblings concatenate weights along out_features: each column's result is bit-identical
    whether it is computed alone, in a slice, or at another position of a wider weight. Holds for
    the library's kernels; torch's GEMM (fp32 above 16 rows, bf16 above 16 or 8 without a bf16
    kernel, fp32 where the row-sparse GEMM does not run) gives no such promise (MKL's fp32 result
    for a column changes with N)."""
    in_f = 515
    ws = [torch.randn(n, in_f, generator=gen).to(dtype) for n in (70, 33, 130)]
    fused = _col(torch.cat(ws))
    x = distinct_magnitudes(m, in_f, dtype, gen)
    for k in (1, 200, in_f):
        y = qk.sparse_linear(x, fused, k, backend="cpu")
        parts = torch.cat([qk.sparse_linear(x, _col(w), k, backend="cpu") for w in ws], dim=-1)
        one = qk.sparse_linear(x, fused[40:41], k, backend="cpu")
        if _library_kernel_runs(dtype, m, in_f, k):
            assert torch.equal(y, parts) and torch.equal(one, y[:, 40:41])
        else:  # torch's GEMM: only parity (MKL's fp32 result for a column changes with N)
            w_all, xs = torch.cat(ws), R.topk_sparsify(x, k)
            ref64 = F.linear(xs.double(), w_all.double())
            assert_parity(parts, ref64, F.linear(xs, w_all))
            assert_parity(one, ref64[:, 40:41], F.linear(xs, w_all[40:41]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_row_gemm_batches_on_avx2(cap, dtype, gen):
    """Batches run the row-sparse GEMM (sparse_gemm_rows_avx2.cpp) at the AVX2 level (fp32 and fp16
    on Zen 4 at every level, whose 512-bit FMAs run at the 256-bit rate): fp32 above
    the GEMV blocks up to 64 rows for k <= 0.7 d and 128 for k <= 0.55 d (torch's GEMM elsewhere),
    half types from 32 rows for k <= 0.7 d (the GEMV blocks below). Its result matches float64
    across the tile (64 features) and group (512 features) boundaries, with a bias and an odd
    number of outputs, and does not depend on the thread count."""
    rule = _native._C.cpu_sparse_row_gemm
    on = cap == "avx2"
    fp32_on = on or (ZEN4 and cap in ("avx512", "avx512bf16", "amx"))  # 512-bit FMAs at the 256-bit rate
    assert rule("float32", 17, 1000, 500) == fp32_on and rule("float32", 128, 1000, 550) == fp32_on
    assert not rule("float32", 16, 1000, 500)  # the GEMV blocks
    assert not rule("float32", 65, 1000, 701) and not rule("float32", 129, 1000, 500)
    assert not rule("float32", 64, 1000, 1000) and not rule("float32", 64, 1000, 0)
    for half, half_on in (("bfloat16", on), ("float16", fp32_on)):  # Zen 4 has no AVX512-FP16
        assert rule(half, 32, 1000, 700) == half_on and rule(half, 512, 1000, 500) == half_on
        assert not rule(half, 31, 1000, 500) and not rule(half, 64, 1000, 701)
    d, n = 1100, 131
    w = _col(torch.randn(n, d, generator=gen).to(dtype))
    b = torch.randn(n, generator=gen).to(dtype)
    for m, k in ((17, 1), (33, 550), (100, 600), (64, 700)):
        x = distinct_magnitudes(m, d, dtype, gen)
        _check(x, w, k, b)
    old = torch.get_num_threads()  # the panels split over the threads: the same bits on any count
    try:
        torch.set_num_threads(1)
        one = qk.sparse_linear(x, w, 700, b, backend="cpu")
        torch.set_num_threads(2)
        two = qk.sparse_linear(x, w, 700, b, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@pytest.mark.parametrize("m", [5, 16, 17, 130])
def test_batch_path_thread_independent(cap, m, gen):
    x = distinct_magnitudes(m, 1031, torch.bfloat16, gen)
    w = _col(torch.randn(2100, 1031, generator=gen).to(torch.bfloat16))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = qk.sparse_linear(x, w, 500, backend="cpu")
        torch.set_num_threads(2)
        b = qk.sparse_linear(x, w, 500, backend="cpu")
        c = qk.sparse_linear(x, w, 1031, backend="cpu")
        torch.set_num_threads(1)
        d = qk.sparse_linear(x, w, 1031, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b) and torch.equal(c, d)


def test_bf16_rows_per_path(cap):
    """bf16 batches up to 16 rows take the GEMV blocks with vdpbf16ps panels where the CPU has
    AVX512-BF16 but no AMX (csrc/cpu/sparse_linear.cpp: bf16_dp_panels), 12 rows then the AMX
    kernel up to 16 where it has AMX; at::linear above."""
    rows, kernel_rows = _native._C.cpu_sparse_max_rows, _native._C.cpu_sparse_kernel_max_rows
    if cap == "avx512bf16":
        assert rows("bfloat16") == 16 and kernel_rows("bfloat16") == 16
    elif cap == "amx":
        assert rows("bfloat16") == 12 and kernel_rows("bfloat16") == 16


def test_amx_is_used_where_the_cpu_has_it():
    """On a CPU with AMX-BF16 the default (uncapped) batched bf16 kernel is the AMX one."""
    if not HAS["amx"]:
        assert _native._C.cpu_bf16_gemm() in ("avx512bf16" if HAS["avx512bf16"] else "none",)
        return
    assert _native._C.cpu_bf16_gemm() == "amx"


@pytest.mark.parametrize("scale", ["subnormal_x", "underflowing_products", "subnormal_w"])
def test_batch_keeps_subnormals(cap, scale):
    """vdpbf16ps / tdpbf16ps read subnormals as 0 and flush subnormal results; the batched path must
    still match float64 where every output is tiny (the fuzz case: 5 rows of ~1e-39 activations,
    now on the GEMV; one row more than the GEMV takes runs the batched kernel)."""
    gen = torch.Generator().manual_seed(5)
    d, n = 33, 17
    gemv_rows = _native._C.cpu_sparse_max_rows("bfloat16")
    assert gemv_rows >= 5  # so 5 rows take the GEMV, gemv_rows + 1 the path above it (if any)
    for M in (5, min(gemv_rows + 1, 70)):
        x = torch.randn(M, d, generator=gen) + 1.5
        w = torch.randn(n, d, generator=gen) + 1.5
        if scale == "subnormal_x":
            x = x * 2e-39
        elif scale == "underflowing_products":
            x, w = x * 1e-20, w * 1e-20  # normal bf16 values whose products are subnormal in float32
        else:
            w = w * 2e-39
        x, w = x.to(torch.bfloat16), _col(w.to(torch.bfloat16))
        for k in (1, 7, d):
            y = qk.sparse_linear(x, w, k)
            xs = R.topk_sparsify(x, k)
            assert_parity(y, xs.double() @ w.double().t(), F.linear(xs, w))
