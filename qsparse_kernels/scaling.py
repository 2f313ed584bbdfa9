"""The Q-Sparse scaling law (arXiv 2407.10969, Section 3) and its inference-optimal sparsity.

The paper fits the loss of a sparsely-activated model with ``N`` parameters and activation
sparsity ``S`` as a power law in ``N`` whose coefficient grows exponentially in ``1 / (1 - S)``::

    L(N, S) = E + (B + C * exp(beta / (1 - S))) / N ** alpha

with ``E = 1.86, B = 0.01, C = 1.89, alpha = 0.10, beta = 0.05`` (full precision, as published).

Inference-optimal sparsity: at decode time the cost is set by the *activated* parameters
``N_a = (1 - S) N``. Substituting ``N = N_a / (1 - S)``::

    L = E + (B + C e^{beta / (1 - S)}) (1 - S) ** alpha / N_a ** alpha

so for a fixed budget ``N_a`` the best ``S`` minimises ``f(S) = (B + C e^{beta/(1-S)}) (1-S)^alpha``,
independently of ``N_a``. Setting ``d log f / dS = 0`` gives
``beta C e^{beta/(1-S)} = alpha (1 - S) (B + C e^{beta/(1-S)})``, i.e. ``S* ~ 1 - beta / alpha`` when
``B << C``. The paper reports ``S* = 45.58%`` at full precision and ``S* = 61.25%`` for
BitNet b1.58 (1.58-bit weights, its own fit); :func:`optimal_sparsity` returns those.

Caveats: the constants above are rounded as printed, and with them the stationary point is
``S ~ 0.502`` (:func:`stationary_sparsity`), not 45.58%: the published optimum comes from the
paper's unrounded fit and is very sensitive to ``beta / alpha``. The fit covers models of
300M-7B parameters trained on the paper's data; it ignores the cost of the top-K selection
itself and assumes decode cost proportional to activated parameters (true when memory bound, at
batch 1; not for large batches, where Block Q-Sparse applies). Use these numbers as a starting
point for a sweep, not as a guarantee.
"""

from __future__ import annotations

import math

E, B, C, ALPHA, BETA = 1.86, 0.01, 1.89, 0.10, 0.05
PUBLISHED_OPTIMAL = {"full": 0.4558, "1.58": 0.6125}


def _check(N, S) -> None:
    if not (isinstance(N, (int, float)) and not isinstance(N, bool) and N > 0 and math.isfinite(N)):
        raise ValueError(f"qsparse_kernels.scaling: N must be a finite number > 0, got {N!r}")
    if not (isinstance(S, (int, float)) and not isinstance(S, bool) and 0.0 <= S < 1.0):
        raise ValueError(f"qsparse_kernels.scaling: S must be a number in [0, 1), got {S!r}")


def loss(N: float, S: float) -> float:
    """Predicted loss ``E + (B + C exp(beta / (1 - S))) / N**alpha`` for ``N`` parameters (total,
    not activated) at sparsity ``S`` in ``[0, 1)``, with the published full-precision constants."""
    _check(N, S)
    return E + (B + C * math.exp(BETA / (1.0 - S))) / N**ALPHA


def optimal_sparsity(bits: float = 16) -> float:
    """The published inference-optimal sparsity: ``0.4558`` at full precision (``bits`` 16 or 32)
    and ``0.6125`` for BitNet b1.58 (``bits`` 1.58). Other precisions raise ``ValueError`` (the
    paper fits no law for them)."""
    if isinstance(bits, (int, float)) and not isinstance(bits, bool):
        if bits in (16, 32):
            return PUBLISHED_OPTIMAL["full"]
        if math.isclose(bits, 1.58, abs_tol=1e-9):
            return PUBLISHED_OPTIMAL["1.58"]
    raise ValueError(f"qsparse_kernels.scaling.optimal_sparsity: bits must be 16, 32 or 1.58, got {bits!r}")


def stationary_sparsity(alpha: float = ALPHA, beta: float = BETA, b: float = B, c: float = C) -> float:
    """The minimiser in ``[0, 1)`` of ``(b + c exp(beta/(1-S))) (1-S)**alpha`` (the loss at a fixed
    activated-parameter budget), by bisection on its log-derivative. ``0.0`` when the minimum is at
    ``S = 0``. With the rounded published constants this is about 0.502 (see module caveats)."""
    if not (alpha > 0 and beta > 0 and b >= 0 and c > 0):
        raise ValueError("qsparse_kernels.scaling.stationary_sparsity: need alpha > 0, beta > 0, b >= 0, c > 0")

    def dlog(s: float) -> float:  # d/dS log f; increasing in S, sign change at the optimum
        u = 1.0 - s
        e = c * math.exp(beta / u)
        return beta * e / (u * u * (b + e)) - alpha / u

    if dlog(0.0) >= 0:
        return 0.0
    lo, hi = 0.0, 1.0 - 1e-12
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if dlog(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


__all__ = ["loss", "optimal_sparsity", "stationary_sparsity", "E", "B", "C", "ALPHA", "BETA"]
