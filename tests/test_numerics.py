"""The parity oracle itself (tests/numerics.py): float32 results that cancel heavily are held to
what float32 can promise, and a wrong result is still caught."""

import pytest
import torch

from tests.numerics import assert_parity


def _cancelling_dot(seed: int):
    """One output of 143 products of +-100 x N(0, 1) (sum(|t|) / |sum(t)| in the thousands): the
    float64 sum, torch.dot's float32 sum, float32 in blocks of 64 (another valid order), the
    products, and the magnitudes' sum."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 2, (196,), generator=g) * 2 - 1).float() * 100
    xs = torch.zeros(196)
    idx = torch.randperm(196, generator=g)[:143]
    xs[idx] = x[idx]
    w = torch.randn(196, generator=g)
    t = xs * w
    ref = (xs.double() * w.double()).sum().reshape(1, 1)
    blocks = sum((t[i : i + 64].sum() for i in range(0, 196, 64)), torch.tensor(0.0)).reshape(1, 1)
    abs_sum = (xs.double().abs() * w.double().abs()).sum().reshape(1, 1)
    return ref, torch.dot(xs, w).reshape(1, 1), blocks, t, abs_sum


def test_float32_cancellation_is_held_to_float32_accuracy():
    # Seed 35: torch.dot is within 1e-5 by luck, blocks of 64 are not (and miss twice its error).
    ref, plain, blocks, t, abs_sum = _cancelling_dot(35)
    with pytest.raises(AssertionError):
        assert_parity(blocks, ref, plain)
    assert_parity(blocks, ref, plain, abs_sum)
    # A wrong result stays wrong: one product dropped, or counted twice.
    kept = t[t != 0]
    small = kept[kept.abs().argsort()[len(kept) // 10]]  # a small kept product (10th percentile)
    for wrong in (blocks - small, blocks + small):
        with pytest.raises(AssertionError):
            assert_parity(wrong, ref, plain, abs_sum)


def test_float32_well_conditioned_bound_is_unchanged():
    """Without cancellation u * ||abs_sum|| / ||ref|| is far below 1e-5, so the bound stays 1e-5."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.rand(8, 64, generator=g), torch.rand(16, 64, generator=g)
    ref = x.double() @ w.double().T
    y = (ref * (1 + 9e-6)).float()  # just inside 1e-5
    assert_parity(y, ref, None, ref.abs())
    with pytest.raises(AssertionError):
        assert_parity((ref * (1 + 2e-5)).float(), ref, None, ref.abs())
