"""The CUDA kernels (csrc/cuda) against the reference, on two targets:

* ``cuda``: the compiled kernels on a CUDA GPU (skipped without one, with that reason;
  ``benchmarks/gpu_check.sh`` runs them on the GPU machine);
* ``emulated``: the same sources built for the host under the SIMT emulator of ``tests/cuda_emu``
  (every CUDA thread a fiber, real barrier / shuffle / atomic semantics), on CPU tensors, here and
  in CI. It checks the kernels' logic, indexing and launch plans, not their speed.

Both call the kernel ops directly (``torch.ops.qsparse.*_kernel`` on CUDA tensors, or
``torch.ops.qsparse_cuda_emu.*_kernel``) with the [M, d] contiguous rows the cuda backend passes.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from qsparse_kernels.backends._native_ops import rows
from tests.cuda_emu import ops as emu_ops
from tests.cuda_emu.build import load
from tests.numerics import FLOAT_DTYPES, assert_parity, check_topk_invariants, distinct_magnitudes
from tests.test_native_quantize import SHAPES as QUANT_SHAPES
from tests.test_native_quantize import assert_same_quantized, quantize_inputs

SIZES = [1, 7, 63, 4097]
NO_GPU = "needs a CUDA GPU (none visible here)"


@dataclass(frozen=True)
class Target:
    name: str
    device: str
    library: str

    @property
    def ops(self):
        return getattr(torch.ops, self.library)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)


def _emulated() -> Target:
    emu_ops.library()
    load().set_sm_count(132)  # an H100 / H200
    return Target("emulated", "cpu", "qsparse_cuda_emu")


@pytest.fixture(scope="module", params=["emulated", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=NO_GPU))])
def kern(request) -> Target:
    return Target("cuda", "cuda", "qsparse") if request.param == "cuda" else _emulated()


def _k_values(d):
    return sorted({0, 1, d // 2, d})


def _sparse_linear_ref(x, w, k, b):
    xs = R.topk_sparsify(x, k)
    return F.linear(xs.double(), w.double(), None if b is None else b.double()), F.linear(xs, w, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_topk_distinct_equals_reference(kern, dtype, d, M):
    x = distinct_magnitudes(M, d, dtype)
    for k in _k_values(d):
        y = kern.ops.topk_sparsify_kernel(kern(x), k)
        assert torch.equal(y.cpu(), R.topk_sparsify(x, k)), (d, M, k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_topk_ties_nan_inf_invariants(kern, dtype):
    x = torch.randint(1, 4, (9, 300)).to(dtype) * (torch.randint(0, 2, (9, 300)) * 2 - 1)
    x[1, 5], x[2, 7], x[2, 8] = float("nan"), float("inf"), -float("inf")
    for k in (1, 2, 3, 150, 299):
        y = kern.ops.topk_sparsify_kernel(kern(x), k).cpu()
        check_topk_invariants(x, y, k)
        # ties keep the lowest index, as the reference; the NaN is kept bit for bit
        torch.testing.assert_close(y, R.topk_sparsify(x, k), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_block_topk(kern, dtype):
    x = distinct_magnitudes(5, 96, dtype)
    for n, m in [(16, 32), (1, 8), (0, 4), (4, 4)]:
        y = kern.ops.block_topk_sparsify_kernel(kern(x), n, m)
        assert torch.equal(y.cpu(), R.block_topk_sparsify(x, n, m))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", QUANT_SHAPES)
def test_quantize_act_bit_exact(kern, dtype, shape):
    x = quantize_inputs(shape, dtype)
    q, s = kern.ops.quantize_act_int8_kernel(kern(rows(x)))
    got = q.cpu().reshape(x.shape), s.cpu().reshape(*x.shape[:-1], 1)
    assert_same_quantized(got, R.quantize_act_int8(x))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d,out_f", [(1, 1), (7, 63), (63, 7), (4097, 130), (256, 4097)])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("layout", ["colmajor", "rowmajor"])
def test_sparse_linear(kern, dtype, d, out_f, M, layout):
    x = torch.randn(M, d).to(dtype)
    w = torch.randn(out_f, d).to(dtype) * d**-0.5
    b = torch.randn(out_f).to(dtype)
    wd = qk.to_fast_layout(kern(w)) if layout == "colmajor" else kern(w)
    for k in _k_values(d):
        y = kern.ops.sparse_linear_kernel(kern(x), wd, k, kern(b)).cpu()
        assert_parity(y, *_sparse_linear_ref(x, w, k, b))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_sparse_linear_unaligned_and_strided_weights(kern, dtype):
    """The 16-byte vector path only where the weight allows it: an odd storage offset, a column
    stride that is not a multiple of 16 bytes, and a weight with both strides > 1."""
    d, out_f, M, k = 96, 70, 2, 40
    x = torch.randn(M, d).to(dtype)
    base = torch.randn(2 * out_f + 1, d + 3).to(dtype) * d**-0.5
    colmajor = qk.to_fast_layout(kern(base))
    weights = {
        "offset": colmajor[1 : out_f + 1, :d],  # data_ptr one element past a 16-byte boundary
        "stride": colmajor[:out_f, :d],  # column stride 2 * out_f + 1 elements
        "both": kern(base)[: 2 * out_f : 2, :d],  # row-major with a row step: strides (2 (d + 3), 1)
    }
    for name, wd in weights.items():
        b = torch.randn(out_f).to(dtype)
        y = kern.ops.sparse_linear_kernel(kern(x), wd, k, kern(b)).cpu()
        assert_parity(y, *_sparse_linear_ref(x, wd.cpu(), k, b)), name


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rows_past_the_stage_buffer(kern, dtype):
    """A row of x one element larger than the 32 KB shared-memory staging buffer: the selection
    reads it from global memory instead (top-K, sparse_linear, ternary_linear), ties included."""
    d, out_f, M = 32 * 1024 // torch.empty((), dtype=dtype).element_size() + 1, 9, 2
    x = torch.randn(M, d).to(dtype)
    x[:, 100:140] = 0.5  # ties at the threshold for k = 120 and k = 130
    x[:, :80] = 4.0
    w = torch.randn(out_f, d).to(dtype) * d**-0.5
    packed = R.pack_ternary(torch.randint(-1, 2, (out_f, d), dtype=torch.int8))
    scale = torch.tensor(0.0123)
    for k in (1, 120, 130, d // 2, d - 1):
        assert torch.equal(kern.ops.topk_sparsify_kernel(kern(x), k).cpu(), R.topk_sparsify(x, k)), k
        y = kern.ops.sparse_linear_kernel(kern(x), qk.to_fast_layout(kern(w)), k, None).cpu()
        assert_parity(y, *_sparse_linear_ref(x, w, k, None))
        y = kern.ops.ternary_linear_kernel(kern(x), kern(packed), kern(scale), out_f, k, None).cpu()
        assert torch.equal(y, R.ternary_linear(x, packed, scale, out_f, k, None)), k


@pytest.mark.parametrize("sms", [1, 3, 132])
def test_split_plans_emulated(sms):
    """Split-K plans from one split per tile to many short splits and the 512-row cap per split
    (the emulator's SM count drives the planner; a real GPU has one fixed count)."""
    kern = _emulated()
    load().set_sm_count(sms)
    try:
        d, out_f = 2600, 40
        x, w = torch.randn(2, d), torch.randn(out_f, d) * d**-0.5
        packed = R.pack_ternary(torch.randint(-1, 2, (out_f, d), dtype=torch.int8))
        for k in (1, 9, 513, 1300, d):
            y = kern.ops.sparse_linear_kernel(x, qk.to_fast_layout(w), k, None)
            assert_parity(y, *_sparse_linear_ref(x, w, k, None))
            y = kern.ops.ternary_linear_kernel(x, packed, torch.tensor(0.25), out_f, k, None)
            assert torch.equal(y, R.ternary_linear(x, packed, torch.tensor(0.25), out_f, k, None)), (sms, k)
    finally:
        load().set_sm_count(132)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("d,out_f", [(1, 1), (7, 63), (63, 7), (4097, 130), (256, 4097), (64, 64)])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_ternary_linear_exact(kern, dtype, d, out_f, M):
    x = torch.randn(M, d).to(dtype)
    t = torch.randint(-1, 2, (out_f, d), dtype=torch.int8)
    packed = R.pack_ternary(t)
    scale = torch.tensor(0.0123)
    b = torch.randn(out_f).to(dtype)
    for k in [None, *_k_values(d)]:
        y = kern.ops.ternary_linear_kernel(kern(x), kern(packed), kern(scale), out_f, k, kern(b)).cpu()
        ref = R.ternary_linear(x, packed, scale, out_f, k, b)
        assert torch.equal(y, ref), (d, out_f, M, k)  # int32 accumulator exact, same epilogue order


def test_ternary_unaligned_packed(kern):
    """Packed rows at an address that is not 4-byte aligned take the byte-wise loads."""
    d, out_f = 50, 64  # 16 bytes per row: aligned rows, so only the base offset misaligns them
    t = torch.randint(-1, 2, (out_f, d), dtype=torch.int8)
    packed = R.pack_ternary(t)
    buf = torch.empty(packed.numel() + 1, dtype=torch.uint8)
    buf[1:] = packed.flatten()
    shifted = kern(buf)[1:].view(d, -1)
    x, scale = torch.randn(3, d), torch.tensor(0.5)
    for k in (None, 7, d):
        y = kern.ops.ternary_linear_kernel(kern(x), shifted, kern(scale), out_f, k, None).cpu()
        assert torch.equal(y, R.ternary_linear(x, packed, scale, out_f, k, None))


def test_offsets_beyond_2_31(kern):
    """Kept features whose weight rows start past 2**31 elements (sparse) and bytes (ternary): the
    kernels index with 64-bit offsets. Only the kept rows are written; on CPU the rest of the
    torch.empty storage is never touched, so it costs no memory."""
    d, k, dev = 40_000, 3, kern.device
    kept = torch.tensor([5, 33_000, 39_999])  # 39_999 * 65_536 > 2**31
    x = torch.zeros(1, d)
    x[0, kept] = torch.tensor([1.5, -2.0, 3.0])
    out_f = 65_536
    cols = torch.randn(k, out_f).to(torch.bfloat16)
    store = torch.empty(d, out_f, dtype=torch.bfloat16, device=dev)  # column-major weight [out, d]
    store[kept.to(dev)] = kern(cols)
    y = kern.ops.sparse_linear_kernel(kern(x.to(torch.bfloat16)), store.t(), k, None).cpu()
    xk = x[:, kept].to(torch.bfloat16)
    assert_parity(y, xk.double() @ cols.double(), xk @ cols)
    del store
    out_t = 4 * 65_536  # 65_536 packed bytes per feature row
    rows = R.pack_ternary(torch.randint(-1, 2, (out_t, k), dtype=torch.int8))  # [k, 65_536]
    packed = torch.empty(d, out_t // 4, dtype=torch.uint8, device=dev)
    packed[kept.to(dev)] = kern(rows)
    scale = torch.tensor(0.5)
    y = kern.ops.ternary_linear_kernel(kern(x), packed, kern(scale), out_t, k, None).cpu()
    assert torch.equal(y, R.ternary_linear(x[:, kept], rows, scale, out_t, k))


def test_ternary_nonfinite_rows(kern):
    x = torch.randn(3, 64)
    x[0, 3], x[1, 9] = float("nan"), float("inf")
    packed = R.pack_ternary(torch.randint(-1, 2, (40, 64), dtype=torch.int8))
    y = kern.ops.ternary_linear_kernel(kern(x), kern(packed), kern(torch.tensor(1.0)), 40, None, None).cpu()
    assert torch.isnan(y[:2]).all() and torch.isfinite(y[2]).all()
    ref = R.ternary_linear(x, packed, torch.tensor(1.0), 40, None, None)
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)


def test_deterministic(kern):
    x = kern(torch.randn(3, 4096).to(torch.bfloat16))
    w = qk.to_fast_layout(kern(torch.randn(1100, 4096).to(torch.bfloat16)))
    a = [kern.ops.sparse_linear_kernel(x, w, 2048, None) for _ in range(3)]
    assert all(torch.equal(a[0], b) for b in a[1:])


def test_opcheck(kern):
    x = kern(torch.randn(3, 40))
    w = qk.to_fast_layout(kern(torch.randn(24, 40)))
    packed = kern(R.pack_ternary(torch.randint(-1, 2, (24, 40), dtype=torch.int8)))
    ops = kern.ops
    for op, args in [
        (ops.quantize_act_int8_kernel, (x,)),
        (ops.topk_sparsify_kernel, (x, 11)),
        (ops.block_topk_sparsify_kernel, (x, 3, 8)),
        (ops.sparse_linear_kernel, (x, w, 11, kern(torch.randn(24)))),
        (ops.ternary_linear_kernel, (x, packed, kern(torch.tensor(0.5)), 24, 11, None)),
        (ops.ternary_linear_kernel, (x, packed, kern(torch.tensor(0.5)), 24, None, kern(torch.randn(24)))),
    ]:
        torch.library.opcheck(op.default, args)


def test_kernel_checks(kern):
    dev = kern.device
    with pytest.raises(RuntimeError, match="k must be in"):
        kern.ops.topk_sparsify_kernel(torch.randn(2, 8, device=dev), 9)
    with pytest.raises(RuntimeError, match="packed must be"):
        kern.ops.ternary_linear_kernel(torch.randn(2, 8, device=dev), torch.zeros(8, 3, dtype=torch.uint8, device=dev),
                                       torch.ones((), device=dev), 8, None, None)
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        kern.ops.sparse_linear_kernel(torch.randn(2, 8, device=dev), torch.randn(4, 8, device=dev).half(), 3, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_public_api_on_cuda():
    """The cuda backend's Python wrappers: [..., d] inputs, the dense crossover and row chunking."""
    x = torch.randn(2, 5, 300)
    w = torch.randn(70, 300) * 300**-0.5
    for xi in (x, x[:1, :1]):  # 10 rows: select + cuBLAS; one row: the fused GEMV
        y = qk.sparse_linear(xi.cuda(), qk.to_fast_layout(w.cuda()), 100, backend="cuda").cpu()
        xs = R.topk_sparsify(xi, 100)
        assert_parity(y, F.linear(xs.double(), w.double()), F.linear(xs, w))
    assert_same_quantized(qk.quantize_act_int8(x.cuda(), backend="cuda"), R.quantize_act_int8(x))
    packed = R.pack_ternary(torch.randint(-1, 2, (70, 300), dtype=torch.int8))
    y = qk.ternary_linear(x.cuda(), packed.cuda(), torch.tensor(0.5, device="cuda"), 70, 100, backend="cuda").cpu()
    assert torch.equal(y, R.ternary_linear(x, packed, torch.tensor(0.5), 70, 100))
