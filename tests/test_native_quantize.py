"""The native int8 activation quantizer (CPU, every ISA) vs the reference. The CUDA kernel runs the
same cases in tests/test_cuda_kernels.py (emulated here, on the GPU where one is visible)."""

import pytest
import torch

import qsparse_kernels as qk
from qsparse_kernels import _native
from qsparse_kernels import reference as R
from tests.numerics import FLOAT_DTYPES

ISAS = ["scalar", "avx2", "avx512"]
SHAPES = [(1, 1), (1, 7), (3, 63), (17, 4097), (0, 5), (2, 0), (2, 3, 33)]


@pytest.fixture(params=ISAS)
def isa(request):
    _native._C.set_cpu_isa_cap(request.param)
    yield request.param
    _native._C.set_cpu_isa_cap("")


def quantize_inputs(shape, dtype, device="cpu"):
    """Random rows with a NaN, a -Inf, an all-zero row (the 1e-5 clamp) and an exact half step."""
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(dtype)
    if x.numel() > 4 and x.shape[-1] > 2:
        xf = x.reshape(-1, x.shape[-1])
        xf[0, 1] = float("nan")
        if xf.shape[0] > 1:
            xf[1, 0] = -float("inf")
        if xf.shape[0] > 2:
            xf[2] = 0  # the 1e-5 clamp
            xf[2, 0] = 127 * 1e-5 * 0.5  # exactly half a step: rounds to even (0)
    return x.to(device)


def assert_same_quantized(got, want):
    """(x_q, x_scale) bit-identical to the reference's (NaN scales compare equal)."""
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(q.cpu(), q_ref.cpu())
    assert torch.equal(s.cpu(), s_ref.cpu()) or torch.equal(s.cpu().isnan(), s_ref.cpu().isnan()) and torch.equal(
        s.cpu().nan_to_num(), s_ref.cpu().nan_to_num()
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_matches_reference(isa, dtype, shape):
    x = quantize_inputs(shape, dtype)
    assert_same_quantized(qk.quantize_act_int8(x, backend="cpu"), R.quantize_act_int8(x))


def test_cpu_isa_reported():
    assert _native._C.cpu_isa() in ISAS
    with pytest.raises(Exception, match="unknown CPU ISA"):
        _native._C.set_cpu_isa_cap("sse9")


def test_cpu_threads_bit_identical():
    x = torch.randn(64, 1000)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = qk.quantize_act_int8(x, backend="cpu")
        torch.set_num_threads(2)
        b = qk.quantize_act_int8(x, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kernel_checks_arguments():
    k = torch.ops.qsparse.quantize_act_int8_kernel
    with pytest.raises(RuntimeError, match="must be 2-D"):
        k(torch.randn(4))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        k(torch.randn(2, 4).double())
    with pytest.raises(RuntimeError, match="contiguous"):
        k(torch.randn(4, 2).t())


def test_kernel_opcheck():
    torch.library.opcheck(torch.ops.qsparse.quantize_act_int8_kernel.default, (torch.randn(3, 9),))
