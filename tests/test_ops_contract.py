"""The op contract: registration (opcheck), torch.compile, bad input, backend selection."""

import os
import subprocess
import sys

import pytest
import torch

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from tests.conftest import cpu_backends


def _samples(dtype=torch.float32):
    x = torch.randn(3, 16, dtype=dtype)
    w = torch.randn(8, 16, dtype=dtype)
    wc = qk.to_fast_layout(w)
    b = torch.randn(8, dtype=dtype)
    t = torch.randint(-1, 2, (7, 16), dtype=torch.int8)
    packed = R.pack_ternary(t)
    scale = torch.tensor(0.5)
    return {
        "topk_sparsify": [(x, 5), (x.reshape(3, 2, 8), 8), (x, 0)],
        "block_topk_sparsify": [(x, 2, 4), (x, 4, 4)],
        "sparse_linear": [(x, wc, 7, b), (x, w, 16, None), (x.reshape(1, 3, 16), wc, 1, None)],
        "quantize_act_int8": [(x,), (x.reshape(3, 4, 4),)],
        "quantize_weight_ternary": [(w,)],
        "pack_ternary": [(t,)],
        "unpack_ternary": [(packed, 7)],
        "ternary_linear": [(x, packed, scale, 7, None, None), (x, packed, scale, 7, 5, torch.randn(7, dtype=dtype))],
    }


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(_samples()))
def test_opcheck(op, backend, dtype):
    for args in _samples(dtype)[op]:
        args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and op in ("topk_sparsify", "block_topk_sparsify", "sparse_linear") and i != 2
                     else a for i, a in enumerate(args))
        torch.library.opcheck(getattr(torch.ops.qsparse, op).default, (*args, backend))


def test_compile_fullgraph():
    w = qk.to_fast_layout(torch.randn(8, 16))
    t = torch.randint(-1, 2, (8, 16), dtype=torch.int8)
    packed, scale = qk.pack_ternary(t), torch.tensor(0.25)

    def f(x):
        h = qk.sparse_linear(x, w, 6)
        h = qk.topk_sparsify(h, 4) + qk.block_topk_sparsify(h, 1, 2)
        q, s = qk.quantize_act_int8(h)
        y = qk.ternary_linear(torch.cat([h, h], -1), packed, scale, 8, k=8)
        return y + q.float() * s

    x = torch.randn(2, 16)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


def test_sparse_linear_ste_gradients():
    x = torch.randn(4, 12, requires_grad=True)
    w = torch.randn(5, 12, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    y = qk.sparse_linear(x, w, 4, b)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w.detach())  # every entry of x gets gradient
    torch.testing.assert_close(w.grad, g.t() @ R.topk_sparsify(x.detach(), 4))
    torch.testing.assert_close(b.grad, g.sum(0))


# ---- bad input: a clear exception naming the argument, before any kernel runs ----

x16 = torch.randn(2, 16)
w8 = torch.randn(8, 16)
P = R.pack_ternary(torch.zeros(8, 16, dtype=torch.int8))
S = torch.tensor(1.0)

BAD = [
    (lambda: qk.topk_sparsify(x16.int(), 1), TypeError, "x must be"),
    (lambda: qk.topk_sparsify(torch.tensor(1.0), 1), ValueError, "x must have at least 1"),
    (lambda: qk.topk_sparsify(x16, -1), ValueError, "k must be in"),
    (lambda: qk.topk_sparsify(x16, 17), ValueError, "k must be in"),
    (lambda: qk.topk_sparsify(x16, 1.5), TypeError, "k must be an int"),
    (lambda: qk.topk_sparsify([1.0], 1), TypeError, "x must be a torch.Tensor"),
    (lambda: qk.block_topk_sparsify(x16, 3, 2), ValueError, "n must be in"),
    (lambda: qk.block_topk_sparsify(x16, 1, 5), ValueError, "divisible by m"),
    (lambda: qk.block_topk_sparsify(x16, 1, 0), ValueError, "m must be in"),
    (lambda: qk.sparse_linear(x16, w8.double(), 4), TypeError, "weight must have the dtype"),
    (lambda: qk.sparse_linear(x16, w8[:, :15], 4), ValueError, "weight.shape"),
    (lambda: qk.sparse_linear(x16, w8.reshape(-1), 4), ValueError, "weight must be 2-D"),
    (lambda: qk.sparse_linear(x16, w8, 40), ValueError, "k must be in"),
    (lambda: qk.sparse_linear(x16, w8, 4, torch.randn(7)), ValueError, "bias must have shape"),
    (lambda: qk.sparse_linear(x16, w8, 4, torch.randn(8).half()), TypeError, "bias must have dtype"),
    (lambda: qk.quantize_act_int8(x16.long()), TypeError, "x must be"),
    (lambda: qk.quantize_weight_ternary(torch.randn(4)), ValueError, "weight must be 2-D"),
    (lambda: qk.pack_ternary(torch.zeros(2, 2)), TypeError, "t must be int8"),
    (lambda: qk.pack_ternary(torch.full((2, 2), 2, dtype=torch.int8)), ValueError, "t must hold only"),
    (lambda: qk.unpack_ternary(P.int(), 8), TypeError, "packed must be uint8"),
    (lambda: qk.unpack_ternary(P, 9), ValueError, "packed must have shape"),
    (lambda: qk.ternary_linear(x16, P[:, :1], S, 8), ValueError, "packed must have shape"),
    (lambda: qk.ternary_linear(x16, P[:15], S, 8), ValueError, "packed must have shape"),
    (lambda: qk.ternary_linear(x16, P.to(torch.int8), S, 8), TypeError, "packed must be uint8"),
    (lambda: qk.ternary_linear(x16, P, S.double(), 8), TypeError, "scale must be float32"),
    (lambda: qk.ternary_linear(x16, P, torch.ones(2), 8), ValueError, "scale must be a scalar"),
    (lambda: qk.ternary_linear(x16, P, torch.tensor(float("nan")), 8), ValueError, "scale must be finite"),
    (lambda: qk.ternary_linear(x16, P, torch.tensor(float("inf")), 8), ValueError, "scale must be finite"),
    (lambda: qk.ternary_linear(x16, P, torch.tensor(-1.0), 8), ValueError, "scale must be finite and > 0"),
    (lambda: qk.ternary_linear(x16, P, S, 8, k=17), ValueError, "k must be in"),
    (lambda: qk.ternary_linear(x16, P, S, 8, bias=torch.randn(9)), ValueError, "bias must have shape"),
    (lambda: qk.ternary_linear(x16, P, S, -1), ValueError, "out_features must be in"),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input(i, backend):
    fn, exc, msg = BAD[i]
    with qk.use_backend(backend), pytest.raises(exc, match=msg):
        fn()


def test_sizes_beyond_32bit_indexing_rejected_before_allocation():
    big = torch.empty(2**16, 2**15 + 1, device="meta")
    with pytest.raises(ValueError, match="x has 2147549184 elements"):
        qk.topk_sparsify(big, 1)
    x = torch.empty(2**20, 64, device="meta")
    with pytest.raises(ValueError, match="the output has"):
        qk.sparse_linear(x, torch.empty(4096, 64, device="meta"), 8)
    packed = torch.empty(64, 1024, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="the output has"):
        qk.ternary_linear(x, packed, torch.tensor(1.0, device="meta"), 4096)


def test_bad_input_on_meta_tensors_raises_at_trace_time():
    with pytest.raises(ValueError, match="k must be in"):
        qk.topk_sparsify(torch.empty(2, 4, device="meta"), 5)
    assert qk.sparse_linear(torch.empty(2, 4, device="meta"), torch.empty(3, 4, device="meta"), 2).shape == (2, 3)


# ---- backend selection ----


def _which(op="quantize_act_int8", explicit="auto", device="cpu"):
    from qsparse_kernels.backends import select

    return select(op, explicit, torch.device(device))[0]


def test_backend_info_shape():
    info = qk.backend_info()
    assert set(info) == {"reference", "cpu", "triton", "cuda"}
    for v in info.values():
        assert isinstance(v["built"], bool) and isinstance(v["usable"], bool) and v["reason"]
    assert info["reference"]["usable"]


def test_native_extension_is_built():
    """`make test` builds _C: the cpu backend must be usable, and the CUDA kernels built when the
    toolchain allows it (CI proves that the CUDA sources compile and link)."""
    info = qk.backend_info()
    assert info["cpu"]["usable"], info["cpu"]["reason"]
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda and CUDA_HOME and os.environ.get("QSPARSE_BUILD_CUDA") != "0":
        assert info["cuda"]["built"], info["cuda"]["reason"]
        if not torch.cuda.is_available():
            assert not info["cuda"]["usable"] and "no CUDA device" in info["cuda"]["reason"]


def test_precedence(monkeypatch):
    assert _which() == "cpu"  # auto on a CPU tensor picks the native kernel
    assert _which(explicit="reference") == "reference"
    with qk.use_backend("reference"):
        assert _which() == "reference"
        assert _which(explicit="cpu") == "cpu"  # explicit beats the context
        with qk.use_backend("cpu"):
            assert _which() == "cpu"  # innermost wins
        with qk.use_backend("auto"):
            assert _which() == "cpu"
        assert _which() == "reference"
    monkeypatch.setenv("QSPARSE_BACKEND", "reference")
    assert _which() == "reference"
    with qk.use_backend("cpu"):
        assert _which() == "cpu"  # context beats the environment
    monkeypatch.setenv("QSPARSE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="QSPARSE_BACKEND"):
        _which()


def test_unusable_backend_is_an_error():
    if not qk.backend_info()["cuda"]["usable"]:
        with pytest.raises(RuntimeError, match="'cuda' is not usable"):
            with qk.use_backend("cuda"):
                pass
        with pytest.raises(RuntimeError, match="not usable"):
            qk.quantize_act_int8(x16, backend="cuda")
    with pytest.raises(ValueError, match="must be one of"):
        qk.use_backend("fast").__enter__()
    with pytest.raises(ValueError, match="must be one of"):
        qk.topk_sparsify(x16, 2, backend="gpu")


def test_env_var_in_fresh_process():
    code = "import qsparse_kernels as q; from qsparse_kernels.backends import requested; print(requested())"
    env = dict(os.environ, QSPARSE_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_use_backend_is_context_local():
    import threading

    seen = []
    with qk.use_backend("reference"):
        th = threading.Thread(target=lambda: seen.append(_which()))
        th.start()
        th.join()
        assert _which() == "reference"
    assert seen == ["cpu"]


def test_direct_eager_path_equals_registered_op():
    from qsparse_kernels import _ops

    x, w = torch.randn(3, 64), qk.to_fast_layout(torch.randn(16, 64))
    t = torch.randint(-1, 2, (16, 64), dtype=torch.int8)
    packed, scale = R.pack_ternary(t), torch.tensor(0.1)
    assert _ops.direct_ok(x, w, None)
    assert torch.equal(qk.sparse_linear(x, w, 10), torch.ops.qsparse.sparse_linear(x, w, 10, None, "auto"))
    assert torch.equal(qk.topk_sparsify(x, 5), torch.ops.qsparse.topk_sparsify(x, 5, "auto"))
    assert torch.equal(qk.ternary_linear(x, packed, scale, 16, 9),
                       torch.ops.qsparse.ternary_linear(x, packed, scale, 16, 9, None, "auto"))
    # autograd, fake tensors and dispatch modes take the registered op
    assert not _ops.direct_ok(torch.randn(2, 4, requires_grad=True))
    with torch.no_grad():
        assert _ops.direct_ok(torch.randn(2, 4, requires_grad=True))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not _ops.direct_ok(torch.empty(2, 4))


def test_triton_interpreter_numpy_problem_is_reported():
    """Triton < 3.8's interpreter with numpy >= 2.4 fails on every run-time loop bound: the backend
    says so (and which versions to install) instead of failing inside a kernel."""
    import numpy

    from qsparse_kernels.backends import triton as tb

    real = numpy.__version__
    try:
        numpy.__version__ = "2.4.6"
        msg = tb._interpreter_numpy_problem("3.6.0")
        assert msg is not None and "numpy < 2.4" in msg and "triton>=3.8" in msg
        assert tb._interpreter_numpy_problem("3.8.0") is None
        numpy.__version__ = "2.3.5"
        assert tb._interpreter_numpy_problem("3.6.0") is None
    finally:
        numpy.__version__ = real
