"""The cpu backend's batched ternary_linear (M > 1: prefill) on every ISA path, against the reference.

"amx" is the AMX-INT8 tile kernel (csrc/cpu/ternary_amx.cpp; skipped where the CPU or the kernel
does not grant AMX), "avx512" the AVX-512 (VNNI) strip kernels with AMX turned off, then AVX2 and
scalar. Outputs are compared bit-for-bit with the reference (tests/test_cpu_ternary.py explains why
that also checks the int32 accumulator), and the AMX path bit-for-bit with the forced lower ISAs.
Shapes: 1, 7, 63, 4097 on both sides (out % 4 != 0 and % 16 != 0: tail strips and tail tiles),
batches that are not multiples of 16 (tail row blocks) and that need several row blocks.
"""

import pytest
import torch

from qsparse_kernels import _native
from tests.numerics import FLOAT_DTYPES
from tests.test_cpu_ternary import KERNEL, Expected, _ks, assert_same, check_float32_rows, distinct_x, random_packed

pytestmark = pytest.mark.skipif(not _native.loaded(), reason="qsparse_kernels._C is not built")

ISAS = ["amx", "avx512", "avx2", "scalar"]
SHAPES = [(1, 7), (7, 1), (63, 63), (4097, 7), (7, 4097), (63, 4097), (4097, 63), (130, 1029)]
BATCHES = [2, 5, 8, 17, 64, 130]  # AMX from M = 8 (dense) / 16 (sparse), ternary_linear.cpp


def has_amx() -> bool:
    _native._C.set_cpu_isa_cap("")
    return bool(_native._C.cpu_has_amx_int8())


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param == "amx" and not has_amx():
        pytest.skip("no AMX-INT8 on this CPU (or the kernel did not grant the tile state)")
    _native._C.set_cpu_isa_cap(request.param)
    request.addfinalizer(lambda: _native._C.set_cpu_isa_cap(""))
    if request.param == "avx512":
        assert not _native._C.cpu_has_amx_int8()
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_batch_matches_reference(isa, dtype, shape):
    d, out_f = shape
    packed, _ = random_packed(out_f, d)
    ref = Expected(packed, out_f)
    scale = torch.tensor(0.0371)
    x_all = distinct_x(max(BATCHES), d, dtype)
    for i, M in enumerate(BATCHES):
        if isa == "scalar" and M > 17 and d * out_f > 100_000:
            continue  # the scalar path is the slow definition; M <= 17 covers its loops
        x = x_all[:M]
        for j, k in enumerate(_ks(d)):
            bias = torch.randn(out_f).to(dtype) if (i + j) % 2 else None
            assert_same(KERNEL(x, packed, scale, out_f, k, bias), ref(x, scale, k, bias))


def test_amx_blocks_ending_in_a_partial_strip(threads):
    """356 packed bytes per row: the AMX kernel's 2-strip blocks (128 bytes) end in one of 100
    bytes, a full strip and a 36-byte tail, at 2 threads (one block of 356 at 1 thread)."""
    if not has_amx():
        pytest.skip("no AMX-INT8 on this CPU (or the kernel did not grant the tile state)")
    check_float32_rows(33, 1423, (8, 16, 17), (None, 33 // 2), 0.0371)


@pytest.mark.parametrize("k", [None, 1229, 0])
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_bit_identical_to_lower_isas(k, threads):
    """Same bits from AMX as from AVX-512 VNNI (and AVX2) on a model-like shape, 1 and 2 threads."""
    if not has_amx():
        pytest.skip("no AMX-INT8")
    d, out_f = 2048, 3001
    packed, _ = random_packed(out_f, d)
    x = torch.randn(37, d).to(torch.bfloat16)
    bias = torch.randn(out_f).to(torch.bfloat16)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = {}
        for isa in ("amx", "avx512", "avx2"):
            _native._C.set_cpu_isa_cap(isa)
            outs[isa] = KERNEL(x, packed, torch.tensor(0.3), out_f, k, bias)
    finally:
        _native._C.set_cpu_isa_cap("")
        torch.set_num_threads(old)
    assert torch.equal(outs["amx"].view(torch.int16), outs["avx512"].view(torch.int16))
    assert torch.equal(outs["amx"].view(torch.int16), outs["avx2"].view(torch.int16))


def test_batch_accumulator_exact(isa):
    """x_scale = scale = 1: y is the int32 accumulator itself, over several row blocks and strips."""
    from qsparse_kernels import reference as R

    d, out_f, M = 1031, 1029, 33
    packed, _ = random_packed(out_f, d)
    x = torch.randint(-127, 128, (M, d)).float()
    x[:, 5] = 127.0  # absmax 127 -> x_scale = 1 and x_q == x
    for k in (None, d, 300):
        y = KERNEL(x, packed, torch.tensor(1.0), out_f, k, None)
        xs = x if k is None else R.topk_sparsify(x, k)
        acc = R.ternary_accumulate(R.quantize_act_int8(xs)[0], packed, out_f)
        assert torch.equal(y, acc.float())


@pytest.mark.parametrize("isa_name", ["amx", "avx512"])
def test_largest_d_accumulator_bound(isa_name):
    """d = kMaxTernaryD (16,909,320): |acc| reaches 127 * d = 2,147,483,640 without overflow."""
    from qsparse_kernels._validate import MAX_TERNARY_D as MAX_D

    if isa_name == "amx" and not has_amx():
        pytest.skip("no AMX-INT8")
    d, out_f = MAX_D, 4
    # Output 0: t = +1 everywhere, output 1: t = -1, output 2: t = 0, output 3: +1 / -1 alternating.
    byte = torch.full((d,), 2 | (0 << 2) | (1 << 4), dtype=torch.uint8)
    byte |= (torch.arange(d) % 2 * 2).to(torch.uint8) << 6
    packed = byte.reshape(d, 1)
    x = torch.full((2, d), 127.0)
    x[1] = -127.0
    want = torch.tensor([[127.0 * d, -127.0 * d, 0.0, 0.0], [-127.0 * d, 127.0 * d, 0.0, 0.0]])
    _native._C.set_cpu_isa_cap(isa_name)
    try:
        y = KERNEL(x, packed, torch.tensor(1.0), out_f, None, None)
    finally:
        _native._C.set_cpu_isa_cap("")
    assert torch.equal(y, want.float())


def test_deterministic_across_threads_batch(isa):
    d, out_f = 1500, 1001
    packed, _ = random_packed(out_f, d)
    x = distinct_x(70, d, torch.float16)
    old = torch.get_num_threads()
    try:
        for M, k in ((3, None), (17, 600), (70, None), (70, 600)):
            outs = []
            for threads in (1, 2, 1, 2):
                torch.set_num_threads(threads)
                outs.append(KERNEL(x[:M], packed, torch.tensor(0.3), out_f, k, None))
            assert all(torch.equal(o.view(torch.int16), outs[0].view(torch.int16)) for o in outs[1:])
    finally:
        torch.set_num_threads(old)
