"""The per-signature memo of the eager ops' argument checks (``qsparse_kernels._signature``):
bad input raises the same error on every call, a remembered signature still catches what may
change between calls (output size, the scale's value), and the result is the reference's."""

from __future__ import annotations

import pytest
import torch

from qsparse_kernels import _signature, ops, reference


@pytest.fixture(autouse=True)
def _fresh_tables():
    _signature._signatures.clear()
    _signature._scales.clear()
    yield
    _signature._signatures.clear()
    _signature._scales.clear()


def _ternary(d=64, n=37, dtype=torch.float32):
    w = torch.randn(n, d)
    packed, s = ops.quantize_weight_ternary(w)
    return packed, s.reshape(()).clone(), n


def test_bad_input_raises_every_time():
    x = torch.randn(3, 64)
    w = torch.randn(16, 64)
    for _ in range(3):
        with pytest.raises(ValueError, match="k must be in"):
            ops.sparse_linear(x, w, 65)
        with pytest.raises(TypeError, match="weight must have the dtype"):
            ops.sparse_linear(x, w.double(), 8)
    ops.sparse_linear(x, w, 8)  # the good signature is remembered ...
    with pytest.raises(ValueError, match="k must be in"):  # ... and does not cover another k
        ops.sparse_linear(x, w, 65)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.sparse_linear(x, w, 8, torch.randn(15))


def test_remembered_signature_matches_reference_for_new_batch_sizes():
    w = torch.randn(24, 63)
    for rows in (1, 7, 2, 1):
        x = torch.randn(rows, 63)
        got = ops.sparse_linear(x, w, 9)
        torch.testing.assert_close(got, reference.sparse_linear(x, w, 9), rtol=1e-5, atol=1e-5)
    assert len(_signature._signatures) == 1


def test_parameters_take_the_remembered_path():
    lin = torch.nn.Linear(64, 8)
    x = torch.randn(2, 64)
    with torch.no_grad():
        for _ in range(2):
            got = ops.sparse_linear(x, lin.weight, 16, lin.bias)
    torch.testing.assert_close(got, reference.sparse_linear(x, lin.weight, 16, lin.bias), rtol=1e-5, atol=1e-5)
    assert len(_signature._signatures) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_scale_modified_in_place_is_checked_again(bad):
    packed, scale, n = _ternary()
    x = torch.randn(2, 64)
    ops.ternary_linear(x, packed, scale, n, 16)
    ops.ternary_linear(x, packed, scale, n, 16)
    scale.fill_(bad)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ops.ternary_linear(x, packed, scale, n, 16)


def test_new_scale_tensor_is_checked():
    packed, scale, n = _ternary()
    x = torch.randn(1, 64)
    ops.ternary_linear(x, packed, scale, n, None)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ops.ternary_linear(x, packed, torch.tensor(float("nan")), n, None)


def test_inference_mode_scale_is_never_remembered():
    packed, scale, n = _ternary()
    with torch.inference_mode():
        s = scale.clone()
        x = torch.randn(1, 64)
        ops.ternary_linear(x, packed, s, n, 8)
        s.fill_(-2.0)
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            ops.ternary_linear(x, packed, s, n, 8)


def test_output_size_checked_per_call(monkeypatch):
    w = torch.randn(11, 10)
    ops.sparse_linear(torch.randn(2, 10), w, 3)  # remembered
    monkeypatch.setattr("qsparse_kernels._validate.MAX_NUMEL", 115)  # x (110) and w (110) fit, 11 * 11 not
    with pytest.raises(ValueError, match="the output"):
        ops.sparse_linear(torch.randn(11, 10), w, 3)


def test_table_is_bounded(monkeypatch):
    monkeypatch.setattr(_signature, "_MAX_ENTRIES", 4)
    w = torch.randn(8, 64)
    for k in range(10):
        ops.sparse_linear(torch.randn(1, 64), w, k)
    assert len(_signature._signatures) <= 4
