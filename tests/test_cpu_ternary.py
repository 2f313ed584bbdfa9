"""The cpu backend's ternary_linear (csrc/cpu/ternary*.cpp) against the reference, on every ISA path.

Exactness: the int32 accumulator must equal the reference's. The float32 outputs are compared
bit-for-bit (the epilogue does the reference's float32 operations in its order), so any accumulator
error shows: y = acc * x_scale * scale and one unit of acc is ~1/|acc| relative, far above float32
rounding. test_accumulator_exact also reads acc directly (x_scale = scale = 1).
Inputs have distinct magnitudes (no ties at the top-K boundary, where any choice is allowed).
The batch grid reaches both batch strategies of csrc/cpu/ternary_linear.cpp (prefer_per_row):
per-row for sparse batches and M = 2 dense (M = 3 too on AVX2), the union kernel for dense M = 17
(and M = 3 on AVX-512).
"""

import pytest
import torch

import qsparse_kernels as qk
from qsparse_kernels import _native
from qsparse_kernels import reference as R
from tests.numerics import EPILOGUE_REL, FLOAT_DTYPES

pytestmark = pytest.mark.skipif(not _native.loaded(), reason="qsparse_kernels._C is not built")

ISAS = ["scalar", "avx2", "avx512"]
# (in_features, out_features): 1, 7, 63, 4097 on both sides; out % 4 != 0; 4097 outputs = 16 full
# AVX-512 strips + a 1-byte tail, 64 full AVX2 strips + an overlapped one.
SHAPES = [(1, 1), (7, 7), (63, 63), (4097, 7), (7, 4097), (63, 4097), (4097, 63)]
BATCHES = [0, 1, 2, 3, 17]
KERNEL = None if not _native.loaded() else torch.ops.qsparse.ternary_linear_kernel


@pytest.fixture(params=ISAS)
def isa(request):
    _native._C.set_cpu_isa_cap(request.param)
    request.addfinalizer(lambda: _native._C.set_cpu_isa_cap(""))
    return request.param


# Largest positive bit pattern and spacing per dtype: magnitudes base - step * perm, all distinct,
# spread over a few binades so the int8 activations take many values.
_PATTERNS = {torch.float32: (torch.int32, 0x41000000, 997), torch.bfloat16: (torch.int16, 0x4100, 1),
             torch.float16: (torch.int16, 0x4800, 1)}


def distinct_x(rows: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, d]`` with distinct |x| per row, random signs, |x| <= 8."""
    itype, top, step = _PATTERNS[dtype]
    perm = torch.stack([torch.randperm(d) for _ in range(rows)]) if rows else torch.empty(0, d, dtype=torch.int64)
    x = (top - step * perm).to(itype).view(dtype)
    sign = (torch.randint(0, 2, (rows, d)) * 2 - 1).to(dtype)
    return x * sign


def random_packed(out_f: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(-1, 2, (out_f, d), dtype=torch.int8)
    return R.pack_ternary(t), t


class Expected:
    """The reference ternary_linear with the unpacked weight cached (it is the slow part)."""

    def __init__(self, packed: torch.Tensor, out_f: int):
        self.t64 = R.unpack_codes(packed, out_f).to(torch.float64) - 1  # [in, out]
        self.out_f = out_f

    def __call__(self, x, scale, k=None, bias=None):
        xs = x if k is None else R.topk_sparsify(x, k)
        x_q, x_scale = R.quantize_act_int8(xs)
        acc = (x_q.to(torch.float64) @ self.t64).to(torch.int32)
        return R.ternary_epilogue(acc, x_scale, scale, bias, x.dtype)


def assert_same(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-identical (NaN where the reference has NaN). Stricter than SPEC's 1e-6 epilogue rule."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan), "NaN rows differ"
    yf, rf = y.float()[~nan], ref.float()[~nan]
    torch.testing.assert_close(yf, rf, rtol=EPILOGUE_REL, atol=0)
    assert torch.equal(yf, rf), f"max |diff| {(yf - rf).abs().max().item():.3e} (not bit-identical)"


def check_float32_rows(d: int, out_f: int, rows, ks, scale: float) -> None:
    """A random packed [d, out_f] weight, float32 activations with a bias: KERNEL on the first M
    rows for every M in rows and k in ks, bit-identical to the reference."""
    packed, _ = random_packed(out_f, d)
    ref = Expected(packed, out_f)
    x = distinct_x(max(rows), d, torch.float32)
    s, bias = torch.tensor(scale), torch.randn(out_f)
    for M in rows:
        for k in ks:
            assert_same(KERNEL(x[:M], packed, s, out_f, k, bias), ref(x[:M], s, k, bias))


def _ks(d: int) -> list:
    return sorted({None, 0, 1, d // 2, d}, key=lambda v: -1 if v is None else v)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference(isa, dtype, shape):
    d, out_f = shape
    packed, _ = random_packed(out_f, d)
    ref = Expected(packed, out_f)
    scale = torch.tensor(0.0371)
    for i, M in enumerate(BATCHES):
        x = distinct_x(M, d, dtype)
        for j, k in enumerate(_ks(d)):
            bias = torch.randn(out_f).to(dtype) if (i + j) % 2 else None
            y = KERNEL(x, packed, scale, out_f, k, bias)
            assert_same(y, ref(x, scale, k, bias))


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("k", [None, "d"])
def test_accumulator_exact(isa, k, M):
    """x_scale = scale = 1: y is the int32 accumulator itself, compared with ternary_accumulate."""
    d, out_f = 4097, 1029
    packed, _ = random_packed(out_f, d)
    x = torch.randint(-127, 128, (M, d)).float()
    x[:, 5] = 127.0  # absmax 127 -> x_scale = 1 and x_q == x
    y = KERNEL(x, packed, torch.tensor(1.0), out_f, None if k is None else d, None)
    acc = R.ternary_accumulate(x.to(torch.int8), packed, out_f)
    assert torch.equal(y, acc.float())


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("t", [1, -1])
def test_accumulator_extremes(isa, t, M):
    """Every product at its largest (|x_q| = 127, every weight t): the accumulator is +-127 * d,
    far past int16, so a kernel that sums in narrow integers (the AVX2 M == 1 kernel's int16
    partial sums) must widen them in time."""
    d, out_f = 4097, 259
    packed = R.pack_ternary(torch.full((out_f, d), t, dtype=torch.int8))
    for sign in (1.0, -1.0):
        x = torch.full((M, d), 127.0 * sign)
        y = KERNEL(x, packed, torch.tensor(1.0), out_f, None, None)
        assert torch.equal(y, torch.full((M, out_f), 127.0 * sign * t * d))


def test_large_shape_fp32(isa):
    check_float32_rows(4097, 4097, (1, 2, 17), (None, 1600), 0.02)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_finite_rows(isa, dtype):
    d, out_f = 100, 37
    packed, _ = random_packed(out_f, d)
    ref = Expected(packed, out_f)
    x = distinct_x(4, d, dtype)
    x[0, 3] = float("nan")
    x[1, 50] = -float("inf")
    x[2, 7] = float("inf")
    x[2, 8] = float("nan")
    bias = torch.randn(out_f).to(dtype)
    for k in (None, 0, 1, 30, d):
        y = KERNEL(x, packed, torch.tensor(0.5), out_f, k, bias)
        assert_same(y, ref(x, torch.tensor(0.5), k, bias))
        if k != 0:
            assert torch.isnan(y[:3]).all() and not torch.isnan(y[3]).any()


@pytest.mark.parametrize("k", [None, 40])
def test_public_api_3d(isa, k):
    d, out_f = 96, 50
    packed, _ = random_packed(out_f, d)
    x = distinct_x(6, d, torch.bfloat16).reshape(2, 3, d)
    scale, bias = torch.tensor(0.1), torch.randn(out_f).to(torch.bfloat16)
    y = qk.ternary_linear(x, packed, scale, out_f, k, bias, backend="cpu")
    assert y.shape == (2, 3, out_f)
    assert_same(y, R.ternary_linear(x, packed, scale, out_f, k, bias))
    empty = qk.ternary_linear(x[:0], packed, scale, out_f, k, bias, backend="cpu")
    assert empty.shape == (0, 3, out_f)


def test_deterministic_across_calls_and_threads():
    d, out_f = 2048, 3001
    packed, _ = random_packed(out_f, d)
    x = distinct_x(5, d, torch.bfloat16)
    old = torch.get_num_threads()
    try:
        for isa in ISAS:
            _native._C.set_cpu_isa_cap(isa)
            for M, k in ((1, None), (1, 800), (5, 800), (5, None)):
                outs = []
                for threads in (1, 2, 1, 2):
                    torch.set_num_threads(threads)
                    outs.append(KERNEL(x[:M], packed, torch.tensor(0.3), out_f, k, None))
                assert all(torch.equal(o.view(torch.int16), outs[0].view(torch.int16)) for o in outs[1:])
    finally:
        torch.set_num_threads(old)
        _native._C.set_cpu_isa_cap("")


def test_empty_dims(isa):
    """d = 0 (every row quantizes to zeros: y = bias) and out_features = 0."""
    x, p, s, b = torch.randn(3, 0), torch.zeros(0, 2, dtype=torch.uint8), torch.tensor(0.5), torch.randn(5)
    for k in (None, 0):
        assert_same(KERNEL(x, p, s, 5, k, b), R.ternary_linear(x, p, s, 5, k, b))
    assert KERNEL(torch.randn(3, 8), torch.zeros(8, 0, dtype=torch.uint8), s, 0, 3, None).shape == (3, 0)


def test_invalid_code_3_stays_in_bounds(isa):
    """Code 3 is invalid (output unspecified) but must never read or write out of bounds."""
    d, out_f = 65, 9
    packed = torch.full((d, 3), 0xFF, dtype=torch.uint8)
    y = KERNEL(torch.randn(3, d), packed, torch.tensor(1.0), out_f, 10, None)
    assert y.shape == (3, out_f)


@pytest.mark.parametrize("shape", [(7, 7), (63, 4097), (4097, 63), (300, 2050)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_column_range_of_a_wider_buffer(isa, dtype, shape):
    """A packed weight that is a column range of a wider uint8 buffer (siblings stored side by side,
    nn/_siblings.py) is read in place, row by row: bit-identical to the reference for batches of 1
    to 17 rows (every M == 1, strip, tiled and per-row path), and no byte outside the range reaches
    the result (the others are 0xFF: invalid code 3 everywhere). The second view ends where its
    buffer ends, so a read past a row's bytes there is out of bounds (the sanitizer run sees it)."""
    d, out_f = shape
    packed, _ = random_packed(out_f, d)
    cols = packed.shape[1]
    wide = torch.full((d, 5 + cols + 70), 0xFF, dtype=torch.uint8)
    tail = torch.full((d, 3 + cols), 0xFF, dtype=torch.uint8)
    views = [wide[:, 5 : 5 + cols], tail[:, 3:]]
    ref = Expected(packed, out_f)
    x = distinct_x(17, d, dtype)
    s, bias = torch.tensor(0.75), torch.randn(out_f).to(dtype)
    for view in views:
        view.copy_(packed)
        assert not view.is_contiguous() or d == 1
        for M in (1, 3, 17):
            for k in _ks(d):
                assert_same(KERNEL(x[:M], view, s, out_f, k, bias), ref(x[:M], s, k, bias))


def test_opcheck():
    packed, _ = random_packed(13, 40)
    for args in [
        (torch.randn(3, 40), packed, torch.tensor(0.5), 13, None, None),
        (torch.randn(2, 40).to(torch.bfloat16), packed, torch.tensor([0.5]), 13, 7, torch.randn(13).to(torch.bfloat16)),
        (torch.randn(0, 40).half(), packed, torch.tensor(0.5), 13, 0, None),
    ]:
        torch.library.opcheck(KERNEL, args)


@pytest.mark.parametrize("k", [None, 5])
def test_kernel_takes_any_leading_dims_and_strides(k):
    # The cpu backend passes the public op's arguments straight to the kernel: x [..., d] and
    # packed with any strides.
    d, out_f = 33, 10
    p, _ = random_packed(out_f, d)
    s, bias = torch.tensor(0.7), torch.randn(out_f, dtype=torch.bfloat16)
    x = torch.randn(3, 2, d, dtype=torch.bfloat16)
    want = KERNEL(x.reshape(6, d), p, s, out_f, k, bias).reshape(3, 2, out_f)
    assert torch.equal(KERNEL(x, p, s, out_f, k, bias), want)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    pt = torch.stack([p, p], -1)[..., 0]  # the same bytes as p, strided
    assert not xt.is_contiguous() and not pt.is_contiguous() and torch.equal(pt, p)
    assert torch.equal(KERNEL(xt, pt, s, out_f, k, bias), want)
    assert torch.equal(KERNEL(x[1, 1], p, s, out_f, k, bias), want[1, 1])
    assert KERNEL(x[:0], p, s, out_f, k, bias).shape == (0, 2, out_f)


def test_kernel_checks_arguments():
    d, out_f = 16, 10
    x, s = torch.randn(2, d), torch.tensor(1.0)
    p, _ = random_packed(out_f, d)
    bad = [
        ((torch.tensor(1.0), p, s, out_f, None, None), "at least 1 dimension"),
        ((x.double(), p, s, out_f, None, None), "float32, bfloat16 or float16"),
        ((x, p.to(torch.int8), s, out_f, None, None), "must be Byte"),
        ((x, p[:, :2].contiguous(), s, out_f, None, None), "ceil"),
        ((x, p[:-1], s, out_f, None, None), "ceil"),
        ((x, p, s, out_f + 4, None, None), "ceil"),
        ((x, p, s, -1, None, None), ">= 0"),
        ((x, p, s.double(), out_f, None, None), "must be Float"),
        ((x, p, torch.ones(2), out_f, None, None), "scalar"),
        ((x, p, s, out_f, d + 1, None), "k must be in"),
        ((x, p, s, out_f, -1, None), "k must be in"),
        ((x, p, s, out_f, None, torch.randn(out_f + 1)), "bias must have shape"),
        ((x, p, s, out_f, None, torch.randn(out_f).half()), "bias must have the dtype"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            KERNEL(*args)


@pytest.mark.parametrize("shape", [(65, 32801), (301, 16403), (140001, 9), (1001, 5003), (301, 12285)])
def test_row_split_wide_rows_and_many_rows(isa, shape, threads):
    """Batch 1 on AVX-512 / AVX2 splits the kept rows across threads: packed rows wider than one
    block (8201 bytes > 8192 on AVX-512, 4101 > 3072 on AVX2: several blocks per row), more rows than the in-place
    code scaling allows (140001 > 132100: the shifted-code fallback), rows of 1024-2047 bytes
    (1251: the short-row chunks of 4 quads, ~60 chunks and a partial last one), and rows of 3072
    bytes (12285 outputs: AVX2's widest block, whole, padding outputs in its last byte), against the reference."""
    d, out_f = shape
    check_float32_rows(d, out_f, (1, 2), (None, d // 2 + 1), 0.02)
