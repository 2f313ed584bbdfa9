"""The cpu backend's top-K kernels (csrc/cpu/select_topk.cpp, topk_sparsify.cpp) vs the reference.

Every ISA path (scalar, AVX2, AVX-512), every dtype; exact equality on inputs without ties, the
SPEC invariants plus the documented tie rule (lowest indices first) on inputs with ties.
"""

import pytest
import torch

import qsparse_kernels as qk
from qsparse_kernels import _native
from qsparse_kernels import reference as R
from tests.numerics import FLOAT_DTYPES, check_nan_ties, check_topk_invariants, distinct_magnitudes

pytestmark = pytest.mark.skipif(not qk.backend_info()["cpu"]["usable"], reason="cpu backend not built")

ISAS = ["scalar", "avx2", "avx512"]
SHAPES = [(1, 1), (1, 7), (3, 63), (2, 3, 64), (5, 300), (4, 4097), (0, 5), (3, 0)]


@pytest.fixture(params=ISAS)
def isa(request):
    _native._C.set_cpu_isa_cap(request.param)
    request.addfinalizer(lambda: _native._C.set_cpu_isa_cap(""))
    return request.param


def _ks(d):
    return sorted({k for k in (0, 1, d // 2, d - 1, d) if 0 <= k <= d})


def _rows(shape):
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_matches_reference(isa, dtype, shape, gen):
    x = distinct_magnitudes(_rows(shape), shape[-1], dtype, gen).reshape(shape)
    for k in _ks(shape[-1]):
        y = qk.topk_sparsify(x, k, backend="cpu")
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y, R.topk_sparsify(x, k)), (shape, k)


@pytest.mark.parametrize("d", [4096, 11008, 14336])
def test_topk_large_rows_all_ranks(isa, d, gen):
    """Long rows run the bracketing rounds; ranks near both ends exercise the open brackets."""
    x = distinct_magnitudes(2, d, torch.float32, gen)
    for k in (1, 2, 17, d // 10, d // 2, d - 17, d - 1):
        assert torch.equal(qk.topk_sparsify(x, k, backend="cpu"), R.topk_sparsify(x, k)), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [63, 64, 65, 2048, 5001])
def test_topk_half_rows_all_ranks(isa, dtype, d, gen):
    """Half-type rows from 64 entries take the bisection on the key value on AVX-512 (63: the radix
    rounds); every rank, both ends included, against the reference."""
    x = distinct_magnitudes(3, d, dtype, gen)
    for k in sorted({1, 2, 17, d // 10, d // 2, d - 17, d - 2, d - 1} - {0}):
        assert torch.equal(qk.topk_sparsify(x, k, backend="cpu"), R.topk_sparsify(x, k)), k


@pytest.mark.parametrize("d", [64, 3000])
def test_topk_fp32_keys_sharing_their_top_bits(isa, d, gen):
    """float32 rows whose k-th key shares its top 16 bits with hundreds of others: on AVX2 the
    bisection over the top bits fixes only those, and radix rounds on the low 16 bits (or, for a few
    keys, nth_element) finish. Distinct keys, so the result is exact."""
    narrow = 1.0 + torch.randperm(d, generator=gen).float() * 2.0**-23  # one top-16-bit value: 1.0's
    spread = distinct_magnitudes(1, d, torch.float32, gen)[0] * 4.0
    rows = [narrow, torch.where(torch.arange(d) % 3 == 0, spread, narrow * 2.0)]  # 2.0 + ..: one top too
    sign = torch.randint(0, 2, (2, d), generator=gen) * 2 - 1
    x = torch.stack(rows) * sign
    for k in sorted({1, 2, 17, d // 3, d // 2, d - 17, d - 1}):
        assert torch.equal(qk.topk_sparsify(x, k, backend="cpu"), R.topk_sparsify(x, k)), k


def _hard_rows(d: int, dtype: torch.dtype, gen) -> torch.Tensor:
    """Rows that stress the sampling bracket: heavy ties, sorted, heavy-tailed, a few outliers."""
    sign = torch.randint(0, 2, (6, d), generator=gen) * 2 - 1
    rows = [
        torch.ones(d),  # all tied
        torch.randint(1, 3, (d,), generator=gen).float(),  # two values
        torch.arange(1, d + 1).float(),  # ascending
        torch.arange(d, 0, -1).float(),  # descending
        torch.empty(d).exponential_(generator=gen) ** 4 + 1e-3,  # heavy tail
        torch.where(torch.rand(d, generator=gen) < 0.01, 1e6, 1.0),  # rare outliers above a tied mass
    ]
    return (torch.stack(rows) * sign).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d", [40, 1000, 5000])
def test_topk_ties_invariants_and_same_on_every_isa(dtype, d, gen):
    x = _hard_rows(d, dtype, gen)
    for k in sorted({1, 3, d // 100 + 1, d // 2, d - 1}):
        outs = []
        for name in ISAS:
            _native._C.set_cpu_isa_cap(name)
            try:
                outs.append(qk.topk_sparsify(x, k, backend="cpu"))
            finally:
                _native._C.set_cpu_isa_cap("")
        check_topk_invariants(x, outs[0], k)
        for y in outs[1:]:
            assert torch.equal(y, outs[0]), "ISA paths disagree on ties"


def test_topk_ties_keep_lowest_indices(isa):
    x = torch.ones(2, 1000)
    x[1, 500:] = -1.0
    y = qk.topk_sparsify(x, 300, backend="cpu")
    want = torch.zeros(2, 1000)
    want[:, :300] = 1.0
    assert torch.equal(y, want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_topk_nan_inf(isa, dtype, gen):
    d = 700
    x = distinct_magnitudes(4, d, dtype, gen)
    x[0, 5] = float("nan")
    x[1, 7], x[1, 8] = float("inf"), -float("inf")
    x[2, :3] = float("nan")
    x[3, 100] = float("nan")
    x[3, 200] = -float("inf")
    y = qk.topk_sparsify(x, 1, backend="cpu")
    assert torch.isnan(y[0, 5]) and (y[0] != 0).sum() == 1  # NaN ranks above every number (NaN != 0)
    assert y[1].abs().max() == float("inf") and ((y[1] != 0).sum() == 1)
    y = qk.topk_sparsify(x, 3, backend="cpu")
    assert torch.isnan(y[2, :3]).all()
    assert torch.isnan(y[3, 100]) and y[3, 200] == -float("inf")
    check_topk_invariants(x, y, 3)
    for k in (2, 350):
        check_topk_invariants(x, qk.topk_sparsify(x, k, backend="cpu"), k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_topk_nan_payloads_tie(isa, dtype):
    """NaNs of every payload and sign (signalling ones too) tie above +-Inf, lowest indices first.
    fp16's NaN payloads span several radix digits of its key: the selection must canonicalise them
    before it histograms (a mismatch with the band pass overran the heap; this file runs under ASan)."""
    check_nan_ties(lambda x, k: qk.topk_sparsify(x, k, backend="cpu"), dtype)


def test_topk_negative_zero_dropped_as_positive_zero(isa):
    x = torch.tensor([[-0.0, 3.0, -2.0, 1.0, -5.0]])
    y = qk.topk_sparsify(x, 2, backend="cpu")
    assert y.tolist() == [[0.0, 3.0, 0.0, 0.0, -5.0]]
    assert not torch.signbit(y[0, 0]) and not torch.signbit(y[0, 2])


def test_topk_repeatable_and_thread_independent(gen):
    x = torch.randn(64, 3000, generator=gen).to(torch.bfloat16)  # bf16 randn: plenty of ties
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = qk.topk_sparsify(x, 1000, backend="cpu")
        torch.set_num_threads(2)
        b = qk.topk_sparsify(x, 1000, backend="cpu")
        c = qk.topk_sparsify(x, 1000, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b) and torch.equal(b, c)


# ---- block (N:M) top-K ----


BLOCK_CASES = [
    ((4, 64), 16, 32),
    ((3, 63), 2, 7),
    ((2, 3, 32), 0, 8),
    ((5, 40), 8, 8),
    ((0, 32), 1, 4),
    ((7, 4096), 16, 32),
    ((2, 1000), 300, 500),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,n,m", BLOCK_CASES)
def test_block_topk_matches_reference(isa, dtype, shape, n, m, gen):
    x = distinct_magnitudes(_rows(shape), shape[-1], dtype, gen).reshape(shape)
    y = qk.block_topk_sparsify(x, n, m, backend="cpu")
    assert torch.equal(y, R.block_topk_sparsify(x, n, m))


def test_block_topk_ties(isa, gen):
    x = torch.randint(1, 4, (6, 256), generator=gen).float() * (torch.randint(0, 2, (6, 256), generator=gen) * 2 - 1)
    x[0, 3] = float("nan")
    y = qk.block_topk_sparsify(x, 16, 32, backend="cpu")
    check_topk_invariants(x.reshape(-1, 32), y.reshape(-1, 32), 16)
    assert torch.isnan(y[0, 3])


# ---- the native ops directly ----


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(dtype):
    x = torch.randn(3, 64).to(dtype)
    torch.library.opcheck(torch.ops.qsparse.topk_sparsify_kernel, (x, 20))
    torch.library.opcheck(torch.ops.qsparse.block_topk_sparsify_kernel, (x, 3, 16))


def test_kernels_check_arguments():
    topk, block = torch.ops.qsparse.topk_sparsify_kernel, torch.ops.qsparse.block_topk_sparsify_kernel
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="k must be in"):
        topk(x, 9)
    with pytest.raises(RuntimeError, match="k must be in"):
        topk(x, -1)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        topk(torch.randn(8), 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        topk(torch.randn(8, 2).t(), 1)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        topk(x.double(), 1)
    with pytest.raises(RuntimeError, match="divisible"):
        block(x, 1, 3)
    with pytest.raises(RuntimeError, match="n must be in"):
        block(x, 5, 4)
    with pytest.raises(RuntimeError, match="m must be in"):
        block(x, 0, 0)
