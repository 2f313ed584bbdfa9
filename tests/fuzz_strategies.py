"""Hypothesis strategies for the property tests: shapes, dtypes, strides and nasty values."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.numerics import FLOAT_DTYPES

# Profiles: "ci" (the default, a few hundred examples in all), "long" (>= 10,000 per test,
# `make fuzz`) and the two below for Triton's interpreter. Select with QSPARSE_FUZZ=<name>.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "long", max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck)
)
# The Triton kernels under TRITON_INTERPRET=1 (~0.1 s per example) and the emulated CUDA kernels
# (~0.03 s): the child run of tests/test_triton.py uses "interpreter", `make fuzz` "interpreter-long".
settings.register_profile("interpreter", max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile(
    "interpreter-long", max_examples=2_000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("QSPARSE_FUZZ", "ci"))

dtypes = st.sampled_from(FLOAT_DTYPES)
dims = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 63, 64, 65, 127, 130]), st.integers(0, 300))
rows = st.sampled_from([0, 1, 2, 3, 5, 17])

_SPECIAL = {
    "zero": 0.0,
    "negzero": -0.0,
    "nan": float("nan"),
    "inf": float("inf"),
    "ninf": -float("inf"),
}
_KINDS = ["normal", "ties", "huge", "tiny", "mixed"]


@st.composite
def float_matrix(draw, n_rows=rows, n_cols=dims, specials: bool = True, max_mag: float | None = None):
    """A ``[M, d]`` float tensor (maybe non-contiguous) with a drawn value distribution."""
    dtype = draw(dtypes)
    M, d = draw(n_rows), draw(n_cols)
    kind = draw(st.sampled_from(_KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(M, d, generator=g)
    elif kind == "ties":  # few distinct magnitudes: many ties
        x = torch.randint(-3, 4, (M, d), generator=g).float()
    elif kind == "huge":
        x = torch.randn(M, d, generator=g) * torch.finfo(dtype).max / 8
    elif kind == "tiny":  # subnormals of the dtype
        x = torch.randn(M, d, generator=g) * torch.finfo(dtype).smallest_normal / 4
    else:
        x = torch.randn(M, d, generator=g) * torch.exp(torch.randn(M, d, generator=g) * 8)
    if max_mag is not None:
        x = x.clamp(-max_mag, max_mag)
    x = x.to(dtype)
    if specials and M * d:
        for name in draw(st.lists(st.sampled_from(sorted(_SPECIAL)), max_size=4)):
            i, j = draw(st.integers(0, M - 1)), draw(st.integers(0, d - 1))
            x[i, j] = _SPECIAL[name]
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout == "transposed":  # same values, column-major storage
        x = x.t().contiguous().t()
    elif layout == "sliced" and M:
        big = torch.zeros(M * 2, d, dtype=dtype)
        big[::2] = x
        x = big[::2]
    return x
