"""Property-based tests: every op on every backend runnable here vs the reference (SPEC "Numerics").

Inputs cover empty and odd shapes, all dtypes, non-contiguous strides, k in [0, d], and values
with +-0, subnormals, huge magnitudes, ties, NaN and +-Inf. Profile "ci" by default;
`QSPARSE_FUZZ=long` (make fuzz) runs >= 10,000 examples per test.
"""

import os

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from tests.conftest import cpu_backends
from tests.fuzz_strategies import float_matrix
from tests.numerics import assert_parity, mag_keys

# "cuda-emulated": the CUDA kernels under the SIMT emulator of tests/cuda_emu (on CPU tensors).
# QSPARSE_FUZZ_BACKENDS=triton: the Triton kernels instead (tests/test_triton.py's child run sets
# it together with TRITON_INTERPRET=1 and the smaller "interpreter" profile).
_ONLY = os.environ.get("QSPARSE_FUZZ_BACKENDS")
BACKENDS = st.sampled_from(_ONLY.split(",") if _ONLY else [*cpu_backends(), "cuda-emulated"])


def _run(op: str, backend: str, *args):
    """``qk.<op>(*args, backend=backend)``, or the emulated CUDA kernel for "cuda-emulated"."""
    if backend == "cuda-emulated":
        from tests.cuda_emu import ops as emu

        return getattr(emu, op)(*args)
    return getattr(qk, op)(*args, backend=backend)


def _same_bits_nan_aware(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def _check_topk(x: torch.Tensor, y: torch.Tensor, k: int) -> None:
    """Kept entries are x's (bit-for-bit, NaN-aware), dropped are +0, at most k non-zeros
    (exactly k where x has no zeros), kept |x| >= dropped |x|, and equal to the reference (ties
    included: the lowest indices are kept)."""
    assert y.shape == x.shape and y.dtype == x.dtype
    d = x.shape[-1]
    if x.numel() == 0:
        return
    xf, yf = x.float(), y.float()
    nz = (yf != 0) | torch.isnan(yf)
    assert _same_bits_nan_aware(yf[nz], xf[nz]), "kept entries altered"
    kept_negzero = (xf == 0) & torch.signbit(xf)  # a kept -0 looks like a zero in y
    assert not (torch.signbit(yf) & ~nz & ~kept_negzero).any(), "dropped entries must be +0"
    assert (nz.sum(-1) <= k).all()
    no_zero_rows = (xf != 0).all(-1)
    assert (nz.sum(-1)[no_zero_rows] == min(k, d)).all(), "exactly k kept"
    keys = mag_keys(xf)
    zero_or_kept = nz | (xf == 0)
    lo = torch.where(nz, keys, torch.full_like(keys, 2**40)).amin(-1)
    hi = torch.where(~zero_or_kept, keys, torch.full_like(keys, -1)).amax(-1)
    assert (lo >= hi).all(), "a dropped |x| exceeds a kept |x|"
    # Every backend keeps the lowest indices among equal magnitudes, as the reference does.
    assert _same_bits_nan_aware(yf, R.topk_sparsify(x, k).float()), "differs from the reference"


@given(x=float_matrix(), data=st.data(), backend=BACKENDS)
def test_topk_sparsify(x, data, backend):
    k = data.draw(st.integers(0, x.shape[-1]))
    _check_topk(x, _run("topk_sparsify", backend, x, k), k)


@given(x=float_matrix(n_cols=st.sampled_from([0, 4, 8, 32, 96])), data=st.data(), backend=BACKENDS)
def test_block_topk_sparsify(x, data, backend):
    m = data.draw(st.sampled_from([m for m in (1, 2, 4, 8, 16, 32) if x.shape[-1] % m == 0]))
    n = data.draw(st.integers(0, m))
    y = _run("block_topk_sparsify", backend, x, n, m)
    M, d = x.shape
    _check_topk(x.reshape(M * d // m, m) if d else x, y.reshape(M * d // m, m) if d else y, n)


@given(x=float_matrix(max_mag=100.0, specials=False), data=st.data(), backend=BACKENDS)
def test_sparse_linear(x, data, backend):
    d = x.shape[-1]
    out_f = data.draw(st.sampled_from([1, 3, 7, 64, 65]))
    k = data.draw(st.integers(0, d))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))  # reproducible draws
    w = torch.randn(out_f, d, generator=g).to(x.dtype)
    if data.draw(st.booleans()):
        w = qk.to_fast_layout(w)
    b = torch.randn(out_f, generator=g).to(x.dtype) if data.draw(st.booleans()) else None
    y = _run("sparse_linear", backend, x, w, k, b)
    xs = R.topk_sparsify(x, k)
    ref64 = F.linear(xs.double(), w.double(), None if b is None else b.double())
    assert y.shape == ref64.shape and y.dtype == x.dtype
    if y.numel() and ref64.norm() > 0:
        abs_sum = F.linear(xs.double().abs(), w.double().abs(), None if b is None else b.double().abs())
        assert_parity(y, ref64, F.linear(xs, w, b), abs_sum)


@given(x=float_matrix(), backend=BACKENDS)
def test_quantize_act_int8(x, backend):
    q, s = _run("quantize_act_int8", backend, x)
    q_ref, s_ref = R.quantize_act_int8(x)
    assert torch.equal(q, q_ref)
    assert _same_bits_nan_aware(s, s_ref)


@given(x=float_matrix(), data=st.data(), backend=BACKENDS)
def test_ternary_linear(x, data, backend):
    d = x.shape[-1]
    out_f = data.draw(st.sampled_from([1, 2, 3, 4, 5, 7, 64, 65]))
    k = data.draw(st.one_of(st.none(), st.integers(0, d)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))  # reproducible draws
    t = torch.randint(-1, 2, (out_f, d), dtype=torch.int8, generator=g)
    packed = R.pack_ternary(t)
    scale = torch.tensor(data.draw(st.floats(1e-4, 10.0)), dtype=torch.float32)
    b = torch.randn(out_f, generator=g).to(x.dtype) if data.draw(st.booleans()) else None
    y = _run("ternary_linear", backend, x, packed, scale, out_f, k, b)
    ref = R.ternary_linear(x, packed, scale, out_f, k, b)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN rows differ"
    fin = torch.isfinite(ref) & torch.isfinite(y)
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    # The integer accumulator is exact; the float epilogue agrees to 1e-6 relative (plus the
    # final rounding to a half dtype, one ulp).
    tol = 1e-6 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps
    torch.testing.assert_close(y[fin].float(), ref[fin].float(), rtol=tol, atol=0)
