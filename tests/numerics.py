"""SPEC "Numerics" in one place: the parity rules and the input generators every test uses."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
F32_REL = 1e-5  # float32: relative Frobenius error vs float64
F32_EPS = 2.0**-24  # float32 unit roundoff
HALF_FACTOR = 2.0  # bf16/fp16: <= 2x the error of plain PyTorch in that dtype ...
HALF_ATOL = 1e-6  # ... plus a tiny absolute term
EPILOGUE_REL = 1e-6  # ternary float epilogue

# Positive finite bit patterns used to draw distinct magnitudes (no ties) per dtype.
_BITS = {
    torch.float32: (torch.int32, 0x30000000),
    torch.bfloat16: (torch.int16, 0x2000),
    torch.float16: (torch.int16, 0x1000),
}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ``||y - ref|| / ||ref||`` in float64 (0 when both are 0)."""
    y, ref = y.double(), ref.double()
    den = ref.norm().item()
    num = (y - ref).norm().item()
    return num / den if den > 0 else num


def assert_parity(y: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor | None = None,
                  abs_sum: torch.Tensor | None = None) -> None:
    """``y`` (float32/bf16/fp16) against a float64 reference, by SPEC "Numerics".

    ``plain`` is the same computation done by plain PyTorch in ``y.dtype``; required for half types.
    ``abs_sum``: the sums of the products' magnitudes (``|x| @ |W|^T`` for a linear layer), which
    say how much the result cancels (float32 only, below).
    """
    assert y.shape == ref64.shape, (y.shape, ref64.shape)
    assert torch.isfinite(y).all(), "non-finite output (unwritten or overflowed elements)"
    err = rel_err(y, ref64)
    # Half types: at most twice plain PyTorch's error in that dtype, plus a tiny atol. float32:
    # SPEC's 1e-5, which presumes a well-conditioned result; where even plain float32 PyTorch misses
    # it (heavy cancellation: e.g. one output of 7 random-sign products, sum(|t|) / |sum(t)| ~ 1600,
    # where every float32 summation order is off by ~1e-4 relative), the half-type rule instead.
    # Plain PyTorch's own order can be lucky on such a sum, so with abs_sum the float32 bound is
    # also at least one float32 rounding of the magnitudes' sum, u * ||abs_sum|| / ||ref||: the
    # accuracy any summation order can promise when the result cancels, and far below 1e-5 when it
    # does not (~sqrt(n) u). One output of 143 products of +-100 x N(0, 1) (sum(|t|) / |sum(t)|
    # ~ 1500): float32 in blocks of 64 missed both 1e-5 and twice torch.dot's error while torch.dot
    # met 1e-5 in 1 of 2000 draws (12 of 2000 missed twice torch.dot's error).
    assert y.dtype == torch.float32 or plain is not None, "plain is required for half types"
    base = None if plain is None else rel_err(plain, ref64)
    if y.dtype == torch.float32 and (base is None or base <= F32_REL):
        bound = F32_REL
    else:
        bound = HALF_FACTOR * base + HALF_ATOL
    if y.dtype == torch.float32 and abs_sum is not None and ref64.norm() > 0:
        bound = max(bound, F32_EPS * abs_sum.double().norm().item() / ref64.double().norm().item())
    assert err <= bound, f"{y.dtype} relative error {err:.3e} > {bound:.3e} (plain PyTorch: {base})"


def distinct_magnitudes(rows: int, d: int, dtype: torch.dtype, generator: torch.Generator | None = None):
    """``[rows, d]`` with distinct |x| in each row (random order and signs): top-K has no ties."""
    itype, base = _BITS[dtype]
    bits = torch.stack([torch.randperm(d, generator=generator) for _ in range(rows)]) if rows else torch.empty(0, d)
    x = (bits.to(torch.int64) * 3 + base).to(itype).view(dtype)
    sign = torch.randint(0, 2, (rows, d), generator=generator) * 2 - 1
    return (x.float() * sign).to(dtype)


def randn(*shape, dtype=torch.float32, device="cpu", generator=None) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


def mag_keys(x: torch.Tensor) -> torch.Tensor:
    """|x| as int64 keys ordered like the SPEC orders magnitudes (NaN above +Inf; every NaN, whatever
    its payload, the same key, so NaNs tie and the lowest index wins among them)."""
    keys = x.float().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    return torch.where(keys > 0x7F800000, 0x7FC00000, keys)


def check_topk_invariants(x: torch.Tensor, y: torch.Tensor, k: int) -> None:
    """For ``x`` without zeros: exactly ``k`` kept per row, kept entries copied bit-for-bit,
    dropped ones +0, and every kept |x| >= every dropped |x| (NaN largest)."""
    d = x.shape[-1]
    assert y.shape == x.shape and y.dtype == x.dtype
    x2, y2 = x.reshape(-1, d).float(), y.reshape(-1, d).float()
    assert bool((x2 != 0).all()), "invariant check needs inputs without zeros"
    kept = (y2 != 0) | torch.isnan(y2)
    assert bool((kept.sum(-1) == k).all()), f"kept counts {kept.sum(-1).tolist()} != k={k}"
    yk, xk = y2[kept], x2[kept]
    assert torch.equal(torch.isnan(yk), torch.isnan(xk)), "kept NaN entries were altered"
    finite = ~torch.isnan(xk)  # NaN payloads are not preserved by torch itself; compare the rest bit-for-bit
    assert torch.equal(yk[finite].view(torch.int32), xk[finite].view(torch.int32)), "kept entries were altered"
    assert not bool(torch.signbit(y2[~kept]).any()), "dropped entries must be +0"
    keys = mag_keys(x2)
    lo = torch.where(kept, keys, torch.full_like(keys, 2**40)).amin(-1)
    hi = torch.where(~kept, keys, torch.full_like(keys, -1)).amax(-1)
    assert bool((lo >= hi).all()), "a dropped |x| exceeds a kept |x|"


def assert_elementwise_bound(y: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    """Every element of ``y = linear(xs, w, bias)`` (float32 accumulation, output in ``y.dtype``)
    within the worst-case rounding bound ``(d * 2^-23 + eps(y.dtype)) * (|xs| @ |w|^T + |bias|)``
    (plus one subnormal step of ``y.dtype``, the output rounding below its normal range) of the
    float64 result. Norm-wise parity can average away a few wrong or unwritten elements;
    this cannot (a garbage or zero element misses the bound unless the true value is tiny)."""
    xs64, w64 = xs.double(), w.double()
    ref = F_linear(xs64, w64, None if bias is None else bias.double())
    mag = F_linear(xs64.abs(), w64.abs(), None if bias is None else bias.double().abs())
    fi = torch.finfo(y.dtype)
    bound = (xs.shape[-1] * 2.0**-23 + fi.eps) * mag + fi.smallest_normal * fi.eps
    err = (y.double() - ref).abs()
    bad = ~(err <= bound)
    assert not bool(bad.any()), f"{int(bad.sum())} elements outside the rounding bound, e.g. {y[bad][:4].tolist()}"


def F_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # noqa: N802
    return torch.nn.functional.linear(x, w, b)


# ---- top-K ties among NaNs of any payload (issue 17): the lowest index is kept ----

# (+Inf bits, payload mask) per dtype: a NaN is the Inf pattern plus a nonzero payload.
_NAN_BITS = {torch.float32: (0x7F800000, 0x7FFFFF, torch.int32), torch.float16: (0x7C00, 0x3FF, torch.int16),
             torch.bfloat16: (0x7F80, 0x7F, torch.int16)}


def nan_payload_cases(dtype, seed=0, sizes=(8, 33, 300, 4097)):
    """``[(x [rows, d], k)]``: rows holding NaNs of different payloads and signs (signalling ones
    too) among finite values and +-Inf, with k falling inside the NaNs, at the NaN count, and
    inside an Inf tie just below them; d small and above the CPU selection's sampling threshold."""
    g = torch.Generator().manual_seed(seed)
    inf, mask, itype = _NAN_BITS[dtype]
    cases = []
    for d in sizes:
        rows = 6
        x = (torch.rand(rows, d, generator=g) + 0.5).to(dtype)  # no zeros, no NaN
        n_nan = min(d - 2, 5)
        for r in range(rows):
            pos = torch.randperm(d, generator=g)[: n_nan + 2]
            payloads = torch.randint(1, mask + 1, (n_nan,), generator=g)
            if r % 2:  # payloads falling with the index: the largest payload has the highest index
                payloads = payloads.sort(descending=True).values
            width = 32 if itype == torch.int32 else 16
            for j in range(n_nan):
                bits = inf | int(payloads[j]) | ((1 << (width - 1)) if j % 2 else 0)  # odd j: negative NaN
                bits -= (1 << width) if bits >> (width - 1) else 0  # as a signed integer of that width
                x[r].view(itype)[pos[j]] = bits
            x[r, pos[n_nan]], x[r, pos[n_nan + 1]] = float("inf"), -float("inf")
        for k in (1, 2, n_nan - 1, n_nan, n_nan + 1, d - 1):
            cases.append((x, k))
    return cases


def _kept_mask(y: torch.Tensor) -> torch.Tensor:
    return (y != 0) | torch.isnan(y)


def _expected_kept(x: torch.Tensor, k: int) -> torch.Tensor:
    """The kept mask by the SPEC's rule, written out: NaN > +-Inf > finite by |x|, ties by lowest index."""
    xf = x.float()
    rank = torch.where(torch.isnan(xf), float("inf"), xf.abs().nan_to_num(posinf=3e38))
    rank = torch.where(torch.isinf(xf), 3.1e38, rank)
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(xf, dtype=torch.bool).scatter_(-1, order, True)


def check_nan_ties(run, dtype, sizes=(8, 33, 300, 4097)) -> None:
    """``run(x, k)`` (a topk_sparsify) keeps, on every case of :func:`nan_payload_cases`, exactly the
    entries the SPEC's rule names: NaN of any payload > +-Inf > finite, ties by lowest index."""
    for x, k in nan_payload_cases(dtype, sizes=sizes):
        want = _expected_kept(x, k)
        y = run(x, k)
        assert torch.equal(_kept_mask(y.float()), want), (dtype, x.shape, k)
        assert torch.equal(torch.isnan(y), torch.isnan(x) & want)
