"""qsparse_kernels.nn.RMSNorm and its CPU kernel (csrc/cpu/rms_norm.cpp): HF Llama's RMSNorm.

The kernel against float64 by SPEC "Numerics" (odd widths, every dtype, batch 1 and > 1, strided
inputs, every ISA path), bit for bit in its documented sum order (a crafted input shows the order),
opcheck; the module's dispatch (kernel / reference for autograd, mixed dtypes, torch.compile);
every class in LLAMA_STYLE computes exactly the reference; convert / unconvert / save and load.
"""

import pytest
import torch
import transformers

import qsparse_kernels as qk
from qsparse_kernels import _native
from qsparse_kernels.nn import RMSNorm
from qsparse_kernels.nn.rms_norm import LLAMA_STYLE, reference
from tests.cpu_flags import ISAS, with_isa
from tests.numerics import FLOAT_DTYPES, assert_parity

pytestmark = pytest.mark.skipif(not qk.backend_info()["cpu"]["usable"], reason="cpu backend not built")

SHAPES = [(1,), (7,), (1, 63), (1, 2048), (3, 7, 63), (2, 4097), (5, 16)]


def _kernel(x, w, eps=1e-5):
    return torch.ops.qsparse.rms_norm_kernel(x, w, eps)


def _ref64(x, w, eps):
    """The reference's math in float64, without its rounding to x's dtype."""
    h = x.double()
    return w.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def _inputs(shape, dtype, gen):
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=gen)).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_matches_float64(shape, dtype, isa, gen):
    """Within SPEC's parity of the reference in that dtype (which rounds twice, as HF does)."""
    x, w = _inputs(shape, dtype, gen)
    y = with_isa(isa, lambda: _kernel(x, w))
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_parity(y, _ref64(x, w, 1e-5), reference(x, w, 1e-5))


def _documented_order(x, w, eps):
    """csrc/cpu/rms_norm.cpp's result: lane l of 64 adds x[i]^2 for i = l mod 64 with a fused
    multiply-add (one rounding to float32, emulated in float64), lanes folded 32, 16, 8, 4, 2, 1."""
    xf = x.float()
    d = xf.shape[-1]
    pad = (-d) % 64
    lanes = torch.nn.functional.pad(xf, (0, pad)).reshape(*xf.shape[:-1], -1, 64)
    s = torch.zeros(*xf.shape[:-1], 64)
    for c in range(lanes.shape[-2]):
        v = lanes[..., c, :].double()
        s = (v * v + s.double()).float()
    for h in (32, 16, 8, 4, 2, 1):
        s = s[..., :h] + s[..., h : 2 * h]
    # Each scalar step once rounded to float32 (done in float64 and rounded: exact for / and sqrt).
    # Not torch's float32 ops: its division by a Python number multiplies by the reciprocal.
    f32 = lambda t: t.float().double()  # noqa: E731
    eps32 = f32(torch.tensor(eps))
    inv = f32(1.0 / f32(torch.sqrt(f32(f32(s.double() / d) + eps32)))).float()
    return (w.float() * (xf * inv).to(x.dtype).float()).to(x.dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_runs_in_its_documented_order(dtype, isa, gen):
    """Bit for bit the documented order, so one result on every ISA path."""
    for shape in SHAPES:
        x, w = _inputs(shape, dtype, gen)
        assert torch.equal(with_isa(isa, lambda x=x, w=w: _kernel(x, w, 1e-6)), _documented_order(x, w, 1e-6))


@pytest.mark.parametrize("isa", ISAS)
def test_sum_order_shows_on_a_crafted_input(isa):
    """Lane 0 adds the squares 1, 2^24, then 38 more 1s (x[0], x[64], x[128], ..., x[2496]): in the
    documented order each + 1 after 2^24 is a tie that rounds to 2^24 (even), so the sum is 2^24;
    with the ones added first, or exactly, it is 2^24 + 39 (a float32 sum that tells them apart)."""
    x = torch.zeros(1, 2560)
    x[0, ::64] = 1.0
    x[0, 64] = 2.0**12
    w = torch.ones(2560)
    got = with_isa(isa, lambda: _kernel(x, w, 0.0))
    assert torch.equal(got, _documented_order(x, w, 0.0))
    exact = x * (1.0 / torch.sqrt(torch.tensor((2.0**24 + 39) / 2560, dtype=torch.float32)))
    assert not torch.equal(got, exact)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kernel_takes_strided_inputs(dtype, gen):
    x, w = _inputs((6, 130), dtype, gen)
    xs, ws = x[::2, 1:-1], torch.stack([w, w], 1)[1:-1, 0]
    assert not xs.is_contiguous() and not ws.is_contiguous()
    assert torch.equal(_kernel(xs, ws), _kernel(xs.contiguous(), ws.contiguous()))


def test_kernel_threads_and_rows_agree(gen):
    """Rows split between threads give the rows computed alone."""
    x, w = _inputs((257, 300), torch.bfloat16, gen)
    whole = _kernel(x, w)
    assert torch.equal(whole[100:101], _kernel(x[100:101], w))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(_kernel(x, w), whole)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_finite_inputs_propagate(dtype):
    x = torch.ones(3, 40, dtype=dtype)
    x[0, 5], x[1, 39] = float("nan"), float("inf")
    w = torch.ones(40, dtype=dtype)
    y = _kernel(x, w)
    assert y[0].isnan().all()  # the row's sum is NaN
    assert y[1, :39].eq(0).all() and y[1, 39].isnan()  # sum inf: 1 / sqrt(inf) = 0, inf * 0 = NaN
    torch.testing.assert_close(y, reference(x, w, 1e-5), rtol=0, atol=0, equal_nan=True)


def test_zero_width_and_zero_rows():
    assert _kernel(torch.empty(3, 0), torch.empty(0)).shape == (3, 0)
    assert _kernel(torch.empty(0, 5), torch.ones(5)).shape == (0, 5)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(2, 4), torch.ones(4, dtype=torch.float64)), "weight must have x's dtype"),
        ((torch.ones(2, 4, dtype=torch.int32), torch.ones(4, dtype=torch.int32)), "float32, bfloat16 or float16"),
        ((torch.ones(2, 4), torch.ones(5)), "weight must have x.size"),
        ((torch.ones(2, 4), torch.ones(1, 4)), "1-D"),
        ((torch.tensor(1.0), torch.ones(1)), "at least 1 dimension"),
    ],
)
def test_kernel_rejects_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        _kernel(*args)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(RuntimeError, match="eps must be finite"):
        _kernel(torch.ones(2, 4), torch.ones(4), eps)
    with pytest.raises(ValueError, match="eps must be finite"):
        RMSNorm(4, eps)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(dtype, gen):
    for shape in [(1, 7), (3, 2, 63), (4097,)]:
        x, w = _inputs(shape, dtype, gen)
        torch.library.opcheck(torch.ops.qsparse.rms_norm_kernel.default, (x, w, 1e-6))


# ---- the module ----
def _module(d, dtype, gen):
    m = RMSNorm(d, 1e-6, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.randn(d, generator=gen))
    return m


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_module_inference_runs_the_kernel(dtype, gen, monkeypatch):
    m = _module(63, dtype, gen)
    x = torch.randn(2, 3, 63, generator=gen).to(dtype)
    calls = []
    kernel = _native._C.call_rms_norm
    monkeypatch.setattr(_native._C, "call_rms_norm", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        y = m(x)
    assert calls == [1] and torch.equal(y, _kernel(x, m.weight.detach(), 1e-6))
    with torch.inference_mode():
        assert torch.equal(m(x), y)


def test_module_autograd_is_the_reference(gen):
    """With autograd (a weight that requires grad): the reference, with its gradients."""
    m = _module(40, torch.float32, gen)
    x = torch.randn(3, 40, generator=gen, requires_grad=True)
    y = m(x)
    assert torch.equal(y, reference(x, m.weight, 1e-6))
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    w2 = m.weight.detach().clone().requires_grad_()
    reference(x2, w2, 1e-6).square().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(m.weight.grad, w2.grad)


def test_module_mixed_dtypes_follow_hf(gen):
    """A float32 weight on bf16 activations: HF's promotion (a float32 result), via the reference."""
    m = _module(32, torch.float32, gen)
    x = torch.randn(2, 32, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == torch.float32 and torch.equal(y, reference(x, m.weight, 1e-6))


def test_module_under_torch_compile(gen):
    m = _module(48, torch.bfloat16, gen)
    x = torch.randn(2, 48, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, backend="eager", fullgraph=True)(x)
    assert torch.equal(got, want)


# ---- transformers ----
def _hf_norm_classes():
    found = {}
    for name in sorted(LLAMA_STYLE | {"Olmo2RMSNorm", "GemmaRMSNorm"}):
        family = name.removesuffix("RMSNorm")
        module = {"Qwen2Moe": "qwen2_moe", "Qwen3Moe": "qwen3_moe"}.get(family, family.lower())
        try:
            mod = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[name])
        except ImportError:
            continue
        if hasattr(mod, name):
            found[name] = getattr(mod, name)
    return found


HF_NORMS = _hf_norm_classes()


def test_every_llama_style_class_is_found():
    """The list names real classes of the installed transformers (a typo would never be swapped)."""
    assert LLAMA_STYLE <= set(HF_NORMS), sorted(LLAMA_STYLE - set(HF_NORMS))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(HF_NORMS))
def test_llama_style_classes_compute_the_reference(name, dtype, gen):
    """Each class in LLAMA_STYLE computes exactly ``reference`` (so swapping it changes only the
    float32 sum order), and the two left out on purpose do not: the check can fail."""
    norm = HF_NORMS[name](100, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(100, generator=gen))
        x = (torch.randn(4, 100, generator=gen) * 3).to(dtype)
        same = torch.equal(norm(x), reference(x, norm.weight, 1e-6))
        if name in LLAMA_STYLE:
            fast = RMSNorm.from_module(norm)
            assert fast.weight is norm.weight and fast.variance_epsilon == 1e-6
            assert_parity(fast(x), _ref64(x, norm.weight, 1e-6), norm(x))
            back = fast.to_module()
            assert type(back) is type(norm) and back.weight is norm.weight
    assert same == (name in LLAMA_STYLE) or dtype == torch.float32 and name == "Olmo2RMSNorm"


def test_from_module_refuses_other_norms():
    with pytest.raises(TypeError, match="GemmaRMSNorm is not one of"):
        RMSNorm.from_module(HF_NORMS["GemmaRMSNorm"](8))
    with pytest.raises(TypeError, match="not made by from_module"):
        RMSNorm(8).to_module()


def _llama(dtype=torch.bfloat16):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # float32, as from_pretrained keeps it
    return model


def _norms(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("norm")}


def test_convert_swaps_norms_and_unconvert_restores(tmp_path):
    model = _llama()
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    weights = {n: m.weight for n, m in model.named_modules() if n.endswith("norm")}
    qk.convert(model, qk.QSparseConfig(sparsity=0.0))  # k = d: the projections compute dense
    assert set(_norms(model).values()) == {"RMSNorm"} and len(weights) == 5
    assert all(model.get_submodule(n).weight is w for n, w in weights.items())
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)  # sparse_linear at k = d: another sum order
    assert list(model.state_dict()) == list(_llama().state_dict())
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert set(_norms(loaded).values()) == {"RMSNorm"}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)
    qk.unconvert(model)
    assert set(_norms(model).values()) == {"LlamaRMSNorm"}
    assert all(model.get_submodule(n).weight is w for n, w in weights.items())


def test_convert_fast_norm_false_keeps_hf_norms():
    model = qk.convert(_llama(), qk.QSparseConfig(sparsity=0.5), fast_norm=False)
    assert set(_norms(model).values()) == {"LlamaRMSNorm"}


def test_converted_model_trains_through_the_reference():
    model = qk.convert(_llama(torch.float32), qk.QSparseConfig(sparsity=0.5)).train()
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    assert all(m.weight.grad is not None for n, m in model.named_modules() if n.endswith("norm"))
