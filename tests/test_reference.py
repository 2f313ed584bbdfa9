"""The reference backend against independent float64 / integer formulations and hand-computed cases."""

import pytest
import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from tests.numerics import FLOAT_DTYPES, assert_parity, check_topk_invariants, distinct_magnitudes, mag_keys


def topk_by_sort(x: torch.Tensor, k: int) -> torch.Tensor:
    """Independent top-K: sort the magnitude keys (NaN largest), keep the first k, in float64."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    order = mag_keys(x2).argsort(dim=-1, descending=True, stable=True)[:, :k]
    mask = torch.zeros_like(x2, dtype=torch.bool).scatter_(-1, order, True)
    return torch.where(mask, x2.double(), torch.zeros((), dtype=torch.float64)).reshape(x.shape)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 63), (2, 3, 64), (0, 17), (5, 1)])
def test_topk_matches_sort(dtype, shape, gen):
    d = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    x = distinct_magnitudes(rows, d, dtype, gen).reshape(shape)
    for k in sorted({0, 1, d // 2, d}):
        y = R.topk_sparsify(x, k)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(y.double(), topk_by_sort(x, k)), (shape, k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_topk_ties_nan_inf(dtype, gen):
    d = 40
    x = torch.randint(1, 4, (6, d), generator=gen).to(dtype) * (torch.randint(0, 2, (6, d), generator=gen) * 2 - 1)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[2, 8] = -float("inf")
    x[3, :3] = float("nan")
    for k in (1, 2, 3, 17, d - 1):
        check_topk_invariants(x, R.topk_sparsify(x, k), k)
    y = R.topk_sparsify(x, 1)
    assert torch.isnan(y[1, 5]) and y[2].abs().max() == float("inf")


def test_topk_keeps_negative_zero_dropped_as_positive_zero():
    x = torch.tensor([[-0.0, 3.0, -2.0, 1.0]])
    y = R.topk_sparsify(x, 2)
    assert y.tolist() == [[0.0, 3.0, -2.0, 0.0]]
    assert not torch.signbit(y[0, 0]) and not torch.signbit(y[0, 3])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_block_topk_matches_per_block_sort(dtype, gen):
    n, m = 3, 8
    x = distinct_magnitudes(4, 32, dtype, gen)
    y = R.block_topk_sparsify(x, n, m)
    want = torch.cat([topk_by_sort(x[:, j : j + m], n) for j in range(0, 32, m)], dim=-1)
    assert torch.equal(y.double(), want)
    assert ((y.reshape(4, 4, m) != 0).sum(-1) == n).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_linear_matches_float64(dtype, bias, gen):
    x = torch.randn(3, 5, 63, generator=gen).to(dtype)
    w = torch.randn(17, 63, generator=gen).to(dtype)
    b = torch.randn(17, generator=gen).to(dtype) if bias else None
    for k in (0, 1, 31, 63):
        xs64 = topk_by_sort(x, k)
        ref64 = F.linear(xs64, w.double(), None if b is None else b.double())
        plain = F.linear(R.topk_sparsify(x, k), w, b)
        y = R.sparse_linear(x, w, k, b)
        assert y.dtype == dtype
        if k == 0 and not bias:
            assert (y == 0).all()
        else:
            assert_parity(y, ref64, plain)


def test_sparsity_to_k():
    assert qk.sparsity_to_k(10, 0.6) == 4
    assert qk.sparsity_to_k(4096, 0.5) == 2048
    assert qk.sparsity_to_k(4096, 0.0) == 4096
    assert qk.sparsity_to_k(3, 0.99) == 1
    assert qk.sparsity_to_k(11008, 0.6125) == 4265
    with pytest.raises(ValueError, match="sparsity"):
        qk.sparsity_to_k(10, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        qk.sparsity_to_k(10, -0.1)


# ---- quantizers: hand-computed ----


def test_quantize_act_hand_cases():
    # a = 2.54 -> s = 127/2.54 = 50; 0.01*50 = 0.5 -> 0 (half to even), 0.03*50 = 1.5 -> 2
    x = torch.tensor([[2.54, -2.54, 0.01, 0.03, -0.05]])
    q, s = R.quantize_act_int8(x)
    s_exp = torch.tensor(127.0) / torch.tensor(2.54)
    want = torch.round(x * s_exp).to(torch.int8)
    assert torch.equal(q, want)
    assert q[0, 0] == 127 and q[0, 1] == -127
    assert torch.equal(s, torch.tensor([[2.54]]) / 127.0)


def test_quantize_act_half_to_even():
    # With a = 127 the scale is 1, so x_q = round_half_even(x): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5]])
    q, s = R.quantize_act_int8(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 126]]
    assert s.item() == 1.0


def test_quantize_act_zero_row_clamp():
    q, s = R.quantize_act_int8(torch.zeros(2, 8))
    assert (q == 0).all()
    assert torch.equal(s, torch.full((2, 1), 1e-5) / 127.0)


def test_quantize_act_nonfinite_rows():
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, float("inf"), 2.0], [1.0, 2.0, 4.0]])
    q, s = R.quantize_act_int8(x)
    assert torch.isnan(s[0]).all() and torch.isinf(s[1]).all() and torch.isfinite(s[2]).all()
    assert (q[0] == 0).all() and (q[1] == 0).all()
    assert q[2].tolist() == [32, 64, 127]  # 31.75 -> 32, 63.5 -> 64


def test_quantize_weight_hand_cases():
    w = torch.tensor([[0.5, -1.5, 0.0, 2.0], [0.25, -0.25, 1.0, -1.0]])
    g = w.abs().mean()  # 0.8125
    t_exp = (w * (1.0 / g)).round().clamp(-1, 1).to(torch.int8)
    packed, scale = R.quantize_weight_ternary(w)
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert scale.item() == g.item()
    assert torch.equal(R.unpack_ternary(packed, 2), t_exp)
    # 0.25 / 0.8125 = 0.307 -> 0; 1.0 / 0.8125 = 1.23 -> 1; 0.5 / 0.8125 = 0.615 -> 1
    assert t_exp.tolist() == [[1, -1, 0, 1], [0, 0, 1, -1]]


def test_quantize_weight_all_zero_clamp():
    packed, scale = R.quantize_weight_ternary(torch.zeros(3, 5))
    assert scale.item() == torch.tensor(1e-5).item()
    assert (R.unpack_ternary(packed, 3) == 0).all()


def test_quantize_weight_half_to_even():
    # mean |w| = 1 so w * (1/g) = w: 0.5 -> 0, 1.5 -> 2 -> clamp 1, -0.5 -> -0
    w = torch.tensor([[0.5, 1.5, -0.5, 1.0, 1.0, 1.5]])
    packed, _ = R.quantize_weight_ternary(w)
    assert R.unpack_ternary(packed, 1).tolist() == [[0, 1, 0, 1, 1, 1]]


# ---- packing ----


def test_pack_golden_bytes():
    t = torch.tensor([[1, 0], [-1, 0], [0, 1], [1, -1], [-1, 1]], dtype=torch.int8)  # [out=5, in=2]
    packed = R.pack_ternary(t)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[146, 84], [37, 86]]
    assert torch.equal(R.unpack_ternary(packed, 5), t)


@pytest.mark.parametrize("out_f,in_f", [(1, 1), (5, 3), (7, 9), (64, 33), (4097, 2)])
def test_pack_round_trip(out_f, in_f, gen):
    t = torch.randint(-1, 2, (out_f, in_f), generator=gen, dtype=torch.int8)
    packed = R.pack_ternary(t)
    assert packed.shape == (in_f, (out_f + 3) // 4)
    assert torch.equal(R.unpack_ternary(packed, out_f), t)
    pad = out_f % 4
    if pad:
        last = packed[:, -1].to(torch.int32)
        for j in range(pad, 4):
            assert ((last >> (2 * j)) & 3 == 1).all(), "padding codes must be 1"


def test_unpack_rejects_code_3():
    packed = torch.full((2, 1), 0b01010101, dtype=torch.uint8)
    packed[1, 0] = 0b01110101
    with pytest.raises(ValueError, match="code 3"):
        R.unpack_ternary(packed, 4)


# ---- ternary_linear ----


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k_frac", [None, 0.0, 0.5, 1.0])
def test_ternary_linear_integer_exact(dtype, k_frac, gen):
    d, out_f = 63, 17
    x = torch.randn(2, 3, d, generator=gen).to(dtype)
    t = torch.randint(-1, 2, (out_f, d), generator=gen, dtype=torch.int8)
    packed = R.pack_ternary(t)
    scale = torch.tensor(0.37)
    bias = torch.randn(out_f, generator=gen).to(dtype)
    k = None if k_frac is None else int(k_frac * d)
    y = R.ternary_linear(x, packed, scale, out_f, k, bias)
    xs = x if k is None else R.topk_sparsify(x, k)
    x_q, x_scale = R.quantize_act_int8(xs)
    acc = x_q.to(torch.int64) @ t.to(torch.int64).t()  # independent exact integer matmul
    assert torch.equal(R.ternary_accumulate(x_q.reshape(-1, d), packed, out_f).reshape(acc.shape).to(torch.int64), acc)
    want = (acc.double() * x_scale.double() * 0.37 + bias.double()).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(y.float(), want.float(), rtol=torch.finfo(dtype).eps, atol=0)


def test_ternary_linear_nonfinite_rows_are_nan():
    d, out_f = 8, 5
    x = torch.randn(3, d)
    x[0, 2] = float("nan")
    x[1, 4] = float("inf")
    packed = R.pack_ternary(torch.randint(-1, 2, (out_f, d), dtype=torch.int8))
    y = R.ternary_linear(x, packed, torch.tensor(1.0), out_f)
    assert torch.isnan(y[0]).all() and torch.isnan(y[1]).all() and torch.isfinite(y[2]).all()


def test_quantize_act_scale_is_reciprocal_times_127():
    # HF ActQuant's `127.0 / a` is evaluated by torch as reciprocal(a) * 127 (two roundings). For
    # a = 29.875 that gives 4.2510457..., and 14.9375 * s rounds to 63; one IEEE division
    # (4.2510461...) would give 63.5000... -> 64.
    x = torch.tensor([[14.9375, 29.875]])
    q, _ = R.quantize_act_int8(x)
    assert q.tolist() == [[63, 127]]
    hf_scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)  # ActQuant, literally
    assert torch.equal(q, (x * hf_scale).round().clamp_(-128, 127).to(torch.int8))


def test_float32_parity_rule_under_cancellation():
    """The float32 rule: 1e-5 relative, or at most 2x plain float32 PyTorch where even that misses
    1e-5 (the failing draw that motivated it: one output of 7 terms, sum(|t|) / |sum| ~ 1600)."""
    ref64 = torch.tensor([[-1.4586475617967364e-12]], dtype=torch.float64)
    plain = torch.tensor([[-1.458583254176915e-12]])  # what F.linear gives in float32 (4.4e-5 off)
    assert_parity(plain.clone(), ref64, plain)
    with pytest.raises(AssertionError):
        assert_parity(plain * 1.001, ref64, plain)
    with pytest.raises(AssertionError):  # well-conditioned: 1e-5 holds, whatever plain does
        assert_parity(torch.tensor([[1.0 + 2e-5]]), torch.tensor([[1.0]], dtype=torch.float64), torch.ones(1, 1))
