"""qsparse_kernels.scaling: the published scaling law and inference-optimal sparsity."""

import math

import pytest

from qsparse_kernels import scaling


def test_loss_is_the_published_formula():
    for n, s in [(3e8, 0.0), (1e9, 0.4), (7e9, 0.7), (1.0, 0.999)]:
        expected = 1.86 + (0.01 + 1.89 * math.exp(0.05 / (1 - s))) / n**0.10
        assert scaling.loss(n, s) == pytest.approx(expected, rel=1e-15)
    assert scaling.loss(1e9, 0.5) > scaling.loss(1e9, 0.4)  # more sparsity, higher loss at fixed N
    assert scaling.loss(2e9, 0.5) < scaling.loss(1e9, 0.5)  # more parameters, lower loss
    assert scaling.loss(1e30, 0.0) == pytest.approx(scaling.E, abs=1e-2)


def test_optimal_sparsity_published_values():
    assert scaling.optimal_sparsity() == scaling.optimal_sparsity(16) == scaling.optimal_sparsity(32) == 0.4558
    assert scaling.optimal_sparsity(1.58) == 0.6125
    for bad in (8, 4, 2, "fp16", True):
        with pytest.raises(ValueError, match="bits must be 16, 32 or 1.58"):
            scaling.optimal_sparsity(bad)


def test_stationary_sparsity_minimises_loss_at_fixed_activated_parameters():
    s_star = scaling.stationary_sparsity()
    assert s_star == pytest.approx(0.50238, abs=1e-4)  # the rounded constants; the paper reports 45.58%
    n_a = 1e9  # activated parameters: N = N_a / (1 - S)
    at = lambda s: scaling.loss(n_a / (1 - s), s)
    assert all(at(s_star) < at(s_star + d) for d in (-0.05, -0.01, 0.01, 0.05))
    assert scaling.stationary_sparsity(alpha=0.1, beta=0.2) == 0.0  # beta > alpha: dense is optimal


@pytest.mark.parametrize("n, s", [(0, 0.5), (-1, 0.5), (float("inf"), 0.5), (1e9, 1.0), (1e9, -0.1), (1e9, "x")])
def test_bad_arguments(n, s):
    with pytest.raises(ValueError):
        scaling.loss(n, s)
