"""The ``triton`` backend's tests (collected through ``tests/test_triton.py``).

They run natively on CUDA tensors when a GPU is visible, else on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``, which must be set before triton and qsparse_kernels are
imported: ``test_triton.py`` starts a child pytest for that). Shapes are small and odd; every
buffer the launchers allocate is poisoned first. Configs are passed explicitly where a test must
reach a code path (split-K 1 and > 1, the batch crossover); elsewhere the launchers choose.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from qsparse_kernels.triton import _compat, autotune
from qsparse_kernels.triton.autotune import GemvConfig
from qsparse_kernels.triton.quantize import quantize_rows
from qsparse_kernels.triton.select import topk_rows
from qsparse_kernels.triton.sparse_gemv import sparse_linear_rows, use_sparse
from qsparse_kernels.triton.ternary_gemv import ternary_accumulate_rows, ternary_linear_rows
from tests.numerics import (
    EPILOGUE_REL,
    FLOAT_DTYPES,
    assert_parity,
    check_nan_ties,
    check_topk_invariants,
    distinct_magnitudes,
    mag_keys,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
SIZES = (1, 7, 63, 130)
BATCHES = (1, 3)
# Every GEMV code path: one program per row (split 1) and a split-K reduction, narrow and wide tiles.
CONFIGS = (GemvConfig(32, 16, 1, 1, 1), GemvConfig(16, 8, 3, 1, 1), GemvConfig(128, 32, 2, 4, 2))
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def cfg_id(c: GemvConfig) -> str:
    return f"bn{c.block_n}-bk{c.block_k}-split{c.split_k}"


def ks(d: int) -> list[int]:
    return sorted({0, 1, d // 2, d})


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch):
    """Poisoned buffers; no autotuning in the tests (the heuristic config; one test autotunes)."""
    monkeypatch.setattr(_compat, "POISON_BUFFERS", True)
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "0")


def to_dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def topk64(x: torch.Tensor, k: int) -> torch.Tensor:
    """Independent top-K in float64: sort the magnitude keys (NaN largest), keep the first k."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d).cpu()
    order = mag_keys(x2).argsort(dim=-1, descending=True, stable=True)[:, :k]
    mask = torch.zeros_like(x2, dtype=torch.bool).scatter_(-1, order, True)
    return torch.where(mask, x2.double(), torch.zeros((), dtype=torch.float64)).reshape(x.shape)


# ---------------------------------------------------------------- backend plumbing


def test_backend_usable_and_complete():
    info = qk.backend_info()["triton"]
    assert info["usable"], info["reason"]
    assert set(info["ops"]) >= {"topk_sparsify", "sparse_linear", "quantize_act_int8", "ternary_linear"}


# ---------------------------------------------------------------- top-k selection


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("m", BATCHES)
def test_topk_matches_sort(m, d, dtype, gen):
    (x,) = to_dev(distinct_magnitudes(m, d, dtype, gen))
    for k in ks(d):
        y = qk.topk_sparsify(x, k, backend="triton")
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y.cpu().double(), topk64(x, k)), (m, d, k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_topk_ties_nan_inf(dtype, gen):
    d = 130
    x = torch.randint(1, 4, (6, d), generator=gen).to(dtype) * (torch.randint(0, 2, (6, d), generator=gen) * 2 - 1)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[2, 100] = -float("inf")
    x[3, :3] = float("nan")
    x[4, 64:] = -float("nan")  # sign bit set: still the largest magnitude
    (x,) = to_dev(x)
    for k in (1, 3, 17, 64, d - 1):
        check_topk_invariants(x.cpu(), qk.topk_sparsify(x, k, backend="triton").cpu(), k)
    y = qk.topk_sparsify(x, 1, backend="triton").cpu()
    assert torch.isnan(y[1, 5]) and y[2, 7] == float("inf") and torch.isnan(y[3, 0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_topk_subnormals(dtype):
    """Distinct subnormal magnitudes (and a few normal ones): the narrow-float key shortcut holds."""
    itype = torch.int32 if dtype == torch.float32 else torch.int16
    bits = torch.stack([torch.randperm(100) * 1 + 1 for _ in range(2)])  # subnormal bit patterns
    x = bits.to(itype).view(dtype) * torch.where(torch.rand(2, 100) < 0.5, -1.0, 1.0).to(dtype)
    x = torch.cat([x, torch.tensor([[1.0, -3.0], [2.0, 0.5]], dtype=dtype)], dim=1)
    (xd,) = to_dev(x)
    for k in (1, 2, 3, 51, 101):
        assert torch.equal(qk.topk_sparsify(xd, k, backend="triton").cpu().double(), topk64(x, k)), k


def test_topk_ties_broken_by_lowest_index():
    """All magnitudes equal: the first k features are kept, across chunk boundaries."""
    d = 130
    (x,) = to_dev(torch.tensor([1.0, -1.0]).repeat(2, d // 2))
    for k in (1, 64, 127, 128, 129):  # the interpreter's row block is 128
        y = topk_rows(x, k).cpu()
        want = torch.zeros(2, d)
        want[:, :k] = x[:, :k].cpu()
        assert torch.equal(y, want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_topk_nan_payload_ties_keep_lowest_index(dtype):
    """NaNs of different payloads and signs tie: the lowest index is kept (issue 17; small rows, the
    interpreter is slow)."""
    check_nan_ties(lambda x, k: qk.topk_sparsify(x.to(DEVICE), k, backend="triton").cpu(), dtype, sizes=(8, 33))


def test_topk_zeros_signs_and_strides(gen):
    # Dropped -> +0; kept -0 stays -0 (reference: gather); a non-contiguous 3-D input.
    (x,) = to_dev(torch.tensor([[-0.0, 3.0, -2.0, 1.0]]))
    y = qk.topk_sparsify(x, 2, backend="triton").cpu()
    assert y.tolist() == [[0.0, 3.0, -2.0, 0.0]] and not torch.signbit(y[0, [0, 3]]).any()
    y = topk_rows(x, 4).cpu()  # everything kept: copied bit for bit, -0 included
    assert torch.equal(y.view(torch.int32), x.cpu().view(torch.int32))
    base = distinct_magnitudes(2 * 5 * 2, 63, torch.float32, gen).reshape(2, 5, 2, 63)
    (base,) = to_dev(base)
    x = base[:, :, 1, :]  # strides (630, 126, 1)
    assert not x.is_contiguous()
    y = qk.topk_sparsify(x, 20, backend="triton")
    assert torch.equal(y.cpu().double(), topk64(x.contiguous(), 20))
    xt = base[:, :, 0, :].transpose(0, 1)  # leading dims transposed
    assert torch.equal(qk.topk_sparsify(xt, 5, backend="triton").cpu().double(), topk64(xt.contiguous(), 5))


# ---------------------------------------------------------------- quantize_act_int8


def _assert_quant_equal(got, want):
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(q.cpu(), q_ref)
    s, s_ref = s.cpu(), s_ref
    assert torch.equal(s.isnan(), s_ref.isnan()) and torch.equal(s.nan_to_num(), s_ref.nan_to_num())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 63), (2, 130), (2, 3, 33), (0, 5), (2, 0)])
def test_quantize_bit_exact(shape, dtype):
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(dtype)
    (xd,) = to_dev(x)
    _assert_quant_equal(qk.quantize_act_int8(xd, backend="triton"), R.quantize_act_int8(x))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_quantize_specials(dtype):
    """Half-way codes (row max 127: the scale is exactly 1), the 1e-5 clamp, NaN / Inf rows, tiny rows."""
    d = 130
    x = torch.randn(7, d) * 30
    x[0, :9] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])
    x[0, 9:] = torch.arange(d - 9) / 2 - 60  # every half step from -60 to 0
    x[1] = 0
    x[1, 3] = 127 * 1e-5 * 0.5  # the 1e-5 clamp, exactly half a step
    x[2, 40] = float("nan")
    x[3, 77] = -float("inf")
    x[4] = torch.randn(d) * 1e-30  # tiny in float32 (clamped scale), zero in half types
    x[5, 10] = float("inf")
    x[5, 11] = float("nan")
    x[6] = -x[6].abs()  # the max magnitude is negative
    x = x.to(dtype)
    (xd,) = to_dev(x)
    _assert_quant_equal(qk.quantize_act_int8(xd, backend="triton"), R.quantize_act_int8(x))
    q, s = quantize_rows(xd)  # the launcher behind it, on a transposed (strided) view too
    _assert_quant_equal((q, s.reshape(-1, 1)), R.quantize_act_int8(x))
    q, s = quantize_rows(xd.t().contiguous().t())
    _assert_quant_equal((q, s.reshape(-1, 1)), R.quantize_act_int8(x))


def test_quantize_wide_random_bit_exact():
    """Many values per row so that products land on every kind of rounding boundary."""
    x = torch.randn(4, 4099) * torch.tensor([[1.0], [1e-3], [3e4], [1e-6]])
    (xd,) = to_dev(x)
    _assert_quant_equal(qk.quantize_act_int8(xd, backend="triton"), R.quantize_act_int8(x))


# ---------------------------------------------------------------- sparse_linear


def _weight(n, d, dtype, layout, gen):
    w = torch.randn(n, d, generator=gen).to(dtype)
    (w,) = to_dev(w)
    if layout == "col":  # the fast layout: weight.stride(0) == 1
        return w.t().contiguous().t()
    if layout == "strided":  # every other output row of a taller row-major matrix
        big = torch.zeros(2 * n, d, dtype=dtype, device=DEVICE)
        big[::2] = w
        return big[::2]
    return w


def _sparse_check(y, x, w, k, b):
    xc, wc, bc = x.cpu(), w.cpu(), None if b is None else b.cpu()
    ref64 = F.linear(topk64(xc, k), wc.double(), None if bc is None else bc.double())
    plain = F.linear(R.topk_sparsify(xc, k), wc, bc)
    assert y.dtype == x.dtype and y.shape == ref64.shape
    assert_parity(y.cpu(), ref64, plain)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("d", SIZES)
def test_sparse_linear_parity(d, n, dtype, gen):
    """The public op (batch crossover included) for M in {1, 3}, every k, with and without bias."""
    w = _weight(n, d, dtype, "col", gen)
    (b,) = to_dev(torch.randn(n, generator=gen).to(dtype))
    for m in BATCHES:
        (x,) = to_dev(distinct_magnitudes(m, d, dtype, gen))
        for i, k in enumerate(ks(d)):
            bk = b if (i + m) % 2 else None  # each k with and without bias over the two batches
            _sparse_check(qk.sparse_linear(x, w, k, bk, backend="triton"), x, w, k, bk)


@pytest.mark.parametrize(
    "dtype,cfg,layout",
    [(dt, cfg, "col") for dt in FLOAT_DTYPES for cfg in CONFIGS]
    + [(dt, CONFIGS[1], lay) for dt in (torch.float32, torch.bfloat16) for lay in ("row", "strided")],
    ids=lambda v: DTYPE_IDS.get(v) or (cfg_id(v) if isinstance(v, GemvConfig) else v),
)
def test_sparse_gemv_paths(dtype, cfg, layout, gen):
    """The sparse GEMV itself (no crossover), M = 3: every config, and other weight layouts."""
    d, n = 130, 63
    w = _weight(n, d, dtype, layout, gen)
    (b,) = to_dev(torch.randn(n, generator=gen).to(dtype))
    (x,) = to_dev(distinct_magnitudes(3, d, dtype, gen))
    for k in ks(d):
        bk = b if k % 2 else None
        _sparse_check(sparse_linear_rows(x, w, k, bk, cfg), x, w, k, bk)


def test_sparse_linear_nan_kept_and_dropped(gen):
    d, n = 63, 7
    w = _weight(n, d, torch.float32, "col", gen)
    (x,) = to_dev(distinct_magnitudes(2, d, torch.float32, gen))
    x[0, 5] = float("nan")  # kept by any k >= 1: row 0 is NaN
    x[1, 6] = 1e-30  # dropped
    y = sparse_linear_rows(x, w, 3, None, CONFIGS[1]).cpu()
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


def test_crossover_rule():
    assert use_sparse(1, 4096, 2048) and use_sparse(1, 4096, 409)
    assert not use_sparse(1, 4096, 4096)  # dense: cuBLAS
    assert use_sparse(1, 4096, 0)  # nothing kept: y = bias, one launch
    # Batches: select + cuBLAS (on the H200 the fused GEMV at M = 16 was 4.6x slower than that).
    assert not use_sparse(2, 4096, 41) and not use_sparse(16, 4096, 2048) and not use_sparse(64, 4096, 41)


# ---------------------------------------------------------------- ternary_linear


def _ternary_inputs(m, d, n, dtype, gen):
    """Packed weight and ``x [m, d]`` with distinct |x| per row (top-k has a single answer), each
    row scaled by a power of two (exact) to a max magnitude in [4, 8)."""
    w = torch.randn(n, d, generator=gen)
    packed, scale = R.quantize_weight_ternary(w)
    x = distinct_magnitudes(m, d, dtype, gen).double()
    e = torch.floor(torch.log2(x.abs().amax(-1, keepdim=True)))
    return (x * torch.exp2(2 - e)).to(dtype), packed, scale


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("d", SIZES)
def test_ternary_accumulator_exact(d, n, gen):
    """The int32 accumulator equals the reference exactly, with and without k, every config."""
    x, packed, _ = _ternary_inputs(3, d, n, torch.bfloat16, gen)
    xd, pd = to_dev(x, packed)
    for k in [None, *ks(d)]:
        xs = x if k is None else R.topk_sparsify(x, k)
        q_ref, s_ref = R.quantize_act_int8(xs)
        acc_ref = R.ternary_accumulate(q_ref, packed, n)
        runs = ((None, 3), (CONFIGS[1], 3), (None, 1)) if k in (None, d // 2) else ((None, 3),)
        for cfg, m in runs:
            acc, xscale = ternary_accumulate_rows(xd[:m], pd, n, k, cfg)
            assert acc.dtype == torch.int32
            assert torch.equal(acc.cpu(), acc_ref[:m]), (d, n, k, cfg, m)
            assert torch.equal(xscale.cpu(), s_ref[:m].reshape(-1))


def _assert_epilogue(y, want):
    """The float epilogue within 1e-6 (float32); half types: that value cast, so <= 1 ulp apart."""
    y, want = y.cpu(), want.cpu()
    assert y.dtype == want.dtype and y.shape == want.shape
    assert torch.equal(y.isnan(), want.isnan()), "NaN rows differ"
    yf, wf = y.float().nan_to_num(), want.float().nan_to_num()
    if y.dtype == torch.float32:
        den = wf.double().norm().item()
        assert (yf - wf).double().norm().item() <= EPILOGUE_REL * max(den, 1e-30)
    else:
        ulp = torch.finfo(y.dtype).eps
        assert bool(((yf - wf).abs() <= ulp * wf.abs()).all())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("d,n", [(1, 130), (7, 63), (63, 7), (130, 1), (130, 130)])
def test_ternary_linear_parity(d, n, bias, dtype, gen):
    x, packed, scale = _ternary_inputs(3, d, n, dtype, gen)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    xd, pd, sd, bd = to_dev(x, packed, scale, b)
    # Every k in float32; the half types differ only in the final cast: two k there.
    for k in [None, *ks(d)] if dtype == torch.float32 else [None, d // 2]:
        want = R.ternary_linear(x, packed, scale, n, k, b)
        _assert_epilogue(qk.ternary_linear(xd, pd, sd, n, k, bd, backend="triton"), want)
        if k in (None, d // 2):
            _assert_epilogue(qk.ternary_linear(xd[:1], pd, sd, n, k, bd, backend="triton"), want[:1])
            _assert_epilogue(ternary_linear_rows(xd, pd, sd, n, k, bd, CONFIGS[0]), want)  # split-K 1


def test_ternary_linear_nonfinite_rows(gen):
    d, n = 63, 130
    x, packed, scale = _ternary_inputs(4, d, n, torch.float32, gen)
    x[0, 3] = float("nan")
    x[1, 4] = -float("inf")
    x[2, 5] = float("inf")
    x[2, 6] = float("nan")
    xd, pd, sd = to_dev(x, packed, scale)
    for k in (None, 1, 20, d):
        y = qk.ternary_linear(xd, pd, sd, n, k, backend="triton").cpu()
        assert torch.isnan(y[:3]).all() and torch.isfinite(y[3]).all(), k
        _assert_epilogue(y, R.ternary_linear(x, packed, scale, n, k))
    y0 = qk.ternary_linear(xd, pd, sd, n, 0, backend="triton").cpu()  # nothing kept: finite zeros
    assert torch.equal(y0, torch.zeros_like(y0))


def test_ternary_3d_input_and_invalid_code(gen):
    d, n = 33, 9
    x, packed, scale = _ternary_inputs(6, d, n, torch.float16, gen)
    x3 = x.reshape(2, 3, d)
    xd, pd, sd = to_dev(x3, packed, scale)
    _assert_epilogue(qk.ternary_linear(xd, pd, sd, n, 5, backend="triton"), R.ternary_linear(x3, packed, scale, n, 5))
    bad = pd.clone()
    bad[0, 0] |= 3  # code 3 in output 0: unspecified value, but the kernel must not fault
    y = qk.ternary_linear(xd, bad, sd, n, None, backend="triton")
    assert y.shape == (2, 3, n)


# ---------------------------------------------------------------- selection, compile, autotune


def test_use_backend_context_and_auto(gen):
    d, n = 63, 7
    w = _weight(n, d, torch.float32, "col", gen)
    (x,) = to_dev(distinct_magnitudes(1, d, torch.float32, gen))
    with qk.use_backend("triton"):
        y = qk.sparse_linear(x, w, 9)
    _sparse_check(y, x, w, 9, None)


def test_torch_compile_fullgraph(gen):
    """A function calling the public ops with backend="triton", compiled by inductor with
    fullgraph=True (no graph breaks), matches eager. (Under the interpreter the ``qsparse_triton``
    triton_ops are not registered: ``wrap_triton`` cannot trace interpreted kernels; see
    ``test_triton_op_traced_by_inductor`` on CUDA.)"""
    torch._dynamo.reset()
    d, n = 63, 7
    w = _weight(n, d, torch.float32, "col", gen)
    x, packed, scale = _ternary_inputs(2, d, n, torch.float32, gen)
    xd, pd, sd = to_dev(x, packed, scale)

    def f(x):
        h = qk.sparse_linear(x, w, 16, backend="triton")
        t = qk.ternary_linear(x, pd, sd, n, 8, backend="triton")
        return h * 2, t + 1, qk.topk_sparsify(x, 3, backend="triton")  # elementwise only: bit-exact

    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(xd), f(xd), strict=True):
        assert torch.equal(got, want)


def test_autotune_picks_and_caches(monkeypatch, gen):
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    autotune.clear_cache()
    d, n = 130, 63
    w = _weight(n, d, torch.bfloat16, "col", gen)
    (x,) = to_dev(distinct_magnitudes(1, d, torch.bfloat16, gen))
    _sparse_check(qk.sparse_linear(x, w, 13, backend="triton"), x, w, 13, None)
    if DEVICE == "cuda":
        assert len(autotune._CACHE) == 1  # measured once for this shape key ...
        _sparse_check(qk.sparse_linear(x, w, 14, backend="triton"), x, w, 14, None)
        assert len(autotune._CACHE) == 1  # ... and reused by a k in the same bucket
    else:
        assert autotune._CACHE == {}  # the interpreter never measures: one fixed config
        assert autotune.heuristic(x.device, 1, n, 13, 2) == autotune.INTERPRET_GEMV



def test_deterministic_mode_uses_the_shape_heuristic(monkeypatch):
    """Under torch.use_deterministic_algorithms the config never comes from a measurement."""
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "1")
    autotune.clear_cache()
    dev = torch.device(DEVICE)
    fake = GemvConfig(block_n=16, block_k=16, split_k=1)
    autotune._CACHE[("key",)] = fake  # what an earlier measurement would have left
    benched = []
    bench = lambda cfg: benched.append(cfg) or (lambda: None)  # noqa: E731
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        cfg = autotune.gemv_config(("key",), dev, 1, 300, 40, 2, bench, tracing=False)
    finally:
        torch.use_deterministic_algorithms(was)
    assert cfg == autotune.heuristic(dev, 1, 300, 40, 2) and cfg != fake and benched == []
    assert autotune.gemv_config(("key",), dev, 1, 300, 40, 2, bench, tracing=False) == fake
    autotune.clear_cache()

if DEVICE == "cuda":

    def test_cuda_graph_capture_decode_step(gen):
        """No host synchronisation in the hot path: a decode step captures and replays."""
        d, n = 4096, 1024
        w = _weight(n, d, torch.bfloat16, "col", gen)
        x, packed, scale = _ternary_inputs(1, d, n, torch.bfloat16, gen)
        xd, pd, sd = to_dev(x, packed, scale)

        def step():
            y = qk.sparse_linear(xd, w, 1024, backend="triton")
            return y, qk.ternary_linear(xd, pd, sd, n, 1500, backend="triton")

        with _compat_no_poison():
            eager = step()  # warm-up: compiles the kernels, fills the config cache
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = step()
            xd.copy_(torch.randn_like(xd))
            g.replay()
            torch.cuda.synchronize()
            want = step()
        assert eager[0].shape == out[0].shape
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])

    def test_triton_op_traced_by_inductor(gen):
        """The launchers as ``torch.library.triton_op``: inductor traces into them (the kernels
        become graph nodes) and the result matches eager."""
        assert _compat.HAS_TRITON_OP
        d, n = 512, 384
        w = _weight(n, d, torch.bfloat16, "col", gen)
        x, packed, scale = _ternary_inputs(2, d, n, torch.bfloat16, gen)
        xd, pd, sd = to_dev(x, packed, scale)
        ops = torch.ops.qsparse_triton

        def f(x):
            y = ops.sparse_linear(x, w, 100, None)
            return y * 2, ops.ternary_linear(x, pd, sd, n, 200, None), ops.topk_sparsify(x, 7), ops.quantize_act_int8(x)

        torch._dynamo.reset()
        got = torch.compile(f, fullgraph=True)(xd)
        want = f(xd)
        for g, e in zip(got[:3], want[:3], strict=True):
            assert torch.equal(g, e)
        assert torch.equal(got[3][0], want[3][0]) and torch.equal(got[3][1], want[3][1])

    class _compat_no_poison:
        def __enter__(self):
            self.old, _compat.POISON_BUFFERS = _compat.POISON_BUFFERS, False

        def __exit__(self, *exc):
            _compat.POISON_BUFFERS = self.old
