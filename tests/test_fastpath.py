"""A converted layer's remembered call (nn/_fastpath.py): a repeated call takes it and gives the
same result as the full path; every change the call depends on makes the next call take the full
path again (its result, its errors). Each test first calls the layer so that it holds a plan, then
changes one thing and compares with a layer that never held one."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import qsparse_kernels as qk
from qsparse_kernels import _native, backends
from qsparse_kernels.nn import BitLinear, QSparseLinear, SiblingGroup

D, OUT = 48, 20


def _layer(kind: str, dtype=torch.float32, bias=True) -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(D, OUT, bias=bias).to(dtype)
    if kind == "qsparse":
        return QSparseLinear.from_linear(lin, sparsity=0.5).eval().requires_grad_(False)
    return BitLinear.from_linear(lin, sparsity=0.5).pack().eval().requires_grad_(False)


def _fresh(mod: nn.Module) -> nn.Module:
    """A copy that holds no plan (its first call takes the full path)."""
    c = copy.deepcopy(mod)
    c.__dict__.pop("_plan", None)
    return c


def _planned(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = mod(x)
    assert mod._plan is not None, "the direct call was not remembered"
    return y


KINDS = ["qsparse", "bitlinear"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [(1,), (7,), (2, 3)])
def test_planned_call_equals_the_full_path(kind, dtype, rows):
    mod = _layer(kind, dtype)
    with torch.no_grad():
        _planned(mod, torch.randn(1, D).to(dtype))
        for _ in range(3):  # fresh inputs, other batch shapes: the same plan
            x = torch.randn(*rows, D).to(dtype)
            assert torch.equal(mod(x), _fresh(mod)(x))
    w = (mod.weight, mod.kept(), mod.bias) if kind == "qsparse" else None
    want = qk.sparse_linear(x, *w) if w else qk.ternary_linear(x, mod.packed, mod.scale, OUT, mod.kept(), mod.bias)
    assert torch.equal(mod(x), want)


@pytest.mark.parametrize("kind", KINDS)
def test_attribute_changes_drop_the_plan(kind):
    mod = _layer(kind)
    x = torch.randn(2, D)
    with torch.no_grad():
        _planned(mod, x)
        mod.sparsity = 0.25
        assert mod._plan is None
        assert torch.equal(mod(x), _fresh(mod)(x))
        mod.k = 5
        assert torch.equal(mod(x), _fresh(mod)(x))
        mod.k, mod.sparsity = None, 0.75
        ref = _fresh(mod)(x)
        _planned(mod, x)
        mod.train()  # training mode: the same function for one layer (dropped, rebuilt)
        assert mod._plan is None and torch.equal(mod(x), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_replaced_or_modified_tensors(kind):
    mod = _layer(kind)
    x = torch.randn(3, D)
    with torch.no_grad():
        _planned(mod, x)
        if kind == "qsparse":
            mod.weight.data = qk.to_fast_layout(torch.randn(OUT, D))  # same Parameter, new data
        else:
            mod._buffers["packed"] = qk.quantize_weight_ternary(torch.randn(OUT, D))[0]  # a new buffer object
        assert torch.equal(mod(x), _fresh(mod)(x))
        _planned(mod, x)
        mod.bias.mul_(-3)  # modified in place
        assert torch.equal(mod(x), _fresh(mod)(x))
        _planned(mod, x)
        mod._parameters["bias"] = None  # bias removed behind the module's back
        assert torch.equal(mod(x), _fresh(mod)(x))
        if kind == "qsparse":  # data of another dtype behind the Parameter: the full path's error
            _planned(mod, x)
            mod.weight.data = mod.weight.data.double()
            with pytest.raises(TypeError, match="weight"):
                mod(x)


def test_scale_modified_in_place_is_checked_again():
    mod = _layer("bitlinear")
    x = torch.randn(1, D)
    with torch.no_grad():
        _planned(mod, x)
        mod.scale.mul_(2)
        assert torch.equal(mod(x), _fresh(mod)(x))
        _planned(mod, x)
        mod.scale.fill_(float("nan"))
        with pytest.raises(ValueError, match="scale"):
            mod(x)


@pytest.mark.parametrize("kind", KINDS)
def test_other_inputs_get_the_full_paths_errors(kind):
    mod = _layer(kind)
    with torch.no_grad():
        _planned(mod, torch.randn(1, D))
        with pytest.raises(ValueError, match="dim|shape|in_features|size"):
            mod(torch.randn(1, D + 1))
        # a float32 weight (qsparse) or bias (both): a bf16 input is refused, naming the argument
        with pytest.raises((ValueError, TypeError), match="dtype"):
            mod(torch.randn(1, D, dtype=torch.bfloat16))
        with pytest.raises((ValueError, TypeError)):
            mod(torch.randint(0, 3, (1, D)))
        x = torch.randn(1, D)
        assert torch.equal(mod(x), _fresh(mod)(x))


def test_ternary_input_dtype_change():
    mod = _layer("bitlinear", bias=False)  # no bias: any float input
    with torch.no_grad():
        _planned(mod, torch.randn(1, D))
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.randn(2, D).to(dtype)
            y = mod(x)
            assert y.dtype == dtype and torch.equal(y, _fresh(mod)(x))


def test_autograd_autocast_and_modes_take_the_registered_op():
    mod = _layer("qsparse")
    x = torch.randn(2, D)
    with torch.no_grad():
        _planned(mod, x)
    mod.requires_grad_(True)
    y = mod(x)  # grad mode on, the weight needs a gradient: the autograd op
    assert y.grad_fn is not None
    y.sum().backward()
    assert mod.weight.grad is not None
    with torch.no_grad():
        _planned(mod, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert mod(x).dtype == torch.bfloat16

        seen = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(str(func))
                return func(*args, **(kwargs or {}))

        with Record():
            assert torch.equal(mod(x), _fresh(mod)(x))
        assert any("qsparse" in f for f in seen), seen


@pytest.mark.parametrize("kind", KINDS)
def test_backend_in_force_is_respected(kind, monkeypatch):
    mod = _layer(kind)
    x = torch.randn(1, D)
    op = "sparse_linear" if kind == "qsparse" else "ternary_linear"
    table = backends.ops("reference")
    calls = []

    def counting(*args):
        calls.append(1)
        return real(*args)

    real = table[op]
    monkeypatch.setitem(table, op, counting)
    with torch.no_grad():
        _planned(mod, x)
        _planned(mod, x)
        assert calls == [] or backends.select(op, "auto", x.device)[0] == "reference"
        n = len(calls)
        with qk.use_backend("reference"):
            mod(x)
            mod(x)
        assert len(calls) == n + 2
        mod(x)
        assert len(calls) == n + 2 or backends.select(op, "auto", x.device)[0] == "reference"


def test_inference_tensors_get_no_plan():
    with torch.inference_mode():
        mod = _layer("bitlinear")
        x = torch.randn(1, D)
        y = mod(x)
    assert mod._plan is None  # the scale has no version counter: it is checked on every call
    with torch.no_grad():
        assert torch.equal(mod(x), y)


def test_to_and_load_state_dict_drop_the_plan():
    mod = _layer("qsparse")
    x = torch.randn(1, D)
    with torch.no_grad():
        _planned(mod, x)
        mod.to(torch.float64)
        assert mod._plan is None
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            mod(x)  # float32 input, float64 weight: refused, as without a plan
        mod.to(torch.float32)
        _planned(mod, x)
        other = _layer("qsparse")
        other.weight.data.mul_(2)
        mod.load_state_dict(other.state_dict())
        assert mod._plan is None
        assert torch.equal(mod(x), other(x))


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_and_deepcopy_after_a_planned_call(kind):
    mod = _layer(kind)
    x = torch.randn(2, D)
    with torch.no_grad():
        y = _planned(mod, x)
        for copied in (pickle.loads(pickle.dumps(mod)), copy.deepcopy(mod)):
            assert "_plan" not in copied.__dict__
            assert torch.equal(copied(x), y)
            assert copied._plan is not None and copied._plan.args[0] is not mod._plan.args[0]
        buf = io.BytesIO()
        torch.save(mod, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)


# ---- sibling groups ----


def _trio(kind: str):
    torch.manual_seed(1)
    outs = (24, 8, 8)
    if kind == "qsparse":
        mods = [QSparseLinear.from_linear(nn.Linear(D, n), sparsity=0.5) for n in outs]
    else:
        mods = [BitLinear.from_linear(nn.Linear(D, n), sparsity=0.5) for n in outs]
    mods = [m.eval().requires_grad_(False) for m in mods]
    plain = copy.deepcopy(mods)
    SiblingGroup(mods)
    if kind != "qsparse":
        for m in (*mods, *plain):
            m.pack()
    return mods, plain


def _call(mods, x):
    return [m(x) for m in mods]


@pytest.mark.parametrize("kind", KINDS)
def test_group_plan_and_its_invalidation(kind):
    mods, plain = _trio(kind)
    group = mods[0]._siblings
    x = torch.randn(1, D)
    with torch.no_grad():
        for _ in range(2):
            for a, b in zip(_call(mods, x), _call(plain, x), strict=True):
                assert torch.equal(a, b)
        assert group._plan is not None and not group.disabled
        # a member's setting changes: the group no longer fuses (mismatched settings), results right
        mods[1].sparsity = plain[1].sparsity = 0.25
        assert group._plan is None
        for a, b in zip(_call(mods, x), _call(plain, x), strict=True):
            assert torch.equal(a, b)
        mods[1].sparsity = plain[1].sparsity = 0.5
        _call(mods, x)
        assert group._plan is not None
        # a member's tensor replaced behind its back
        if kind == "qsparse":
            new = qk.to_fast_layout(torch.randn(8, D))
            mods[2]._parameters["weight"] = nn.Parameter(new, requires_grad=False)
            plain[2]._parameters["weight"] = nn.Parameter(new.clone(), requires_grad=False)
        else:
            packed = qk.quantize_weight_ternary(torch.randn(8, D))[0]
            mods[2]._buffers["packed"], plain[2]._buffers["packed"] = packed, packed.clone()
        for a, b in zip(_call(mods, x), _call(plain, x), strict=True):
            assert torch.equal(a, b)
        # a bias modified in place
        mods[0].bias.add_(1), plain[0].bias.add_(1)
        for a, b in zip(_call(mods, x), _call(plain, x), strict=True):
            assert torch.equal(a, b)
        # training mode: each member computes alone
        for m in mods:
            m.train()
        assert group._plan is None
        for a, b in zip(_call(mods, x), _call(plain, x), strict=True):
            assert torch.equal(a, b)
    assert not group.disabled


# ---- csrc/kernel_calls.cpp: the cpu backend's typed calls of the kernel ops ----


def _kernel_cases():
    torch.manual_seed(2)
    x = torch.randn(3, D)
    w = qk.to_fast_layout(torch.randn(OUT, D))
    b = torch.randn(OUT)
    packed, scale = qk.quantize_weight_ternary(torch.randn(OUT, D))
    p2, s2 = qk.quantize_weight_ternary(torch.randn(5, D))
    ops = torch.ops.qsparse
    C = _native._C
    return [
        (C.call_sparse_linear, ops.sparse_linear_kernel.default, (x, w, 7, b)),
        (C.call_sparse_linear, ops.sparse_linear_kernel.default, (x[:1], w, D, None)),
        (C.call_ternary_linear, ops.ternary_linear_kernel.default, (x, packed, scale, OUT, 9, b)),
        (C.call_ternary_linear, ops.ternary_linear_kernel.default, (x[:1], packed, scale, OUT, None, None)),
        (C.call_sparse_linear_multi, ops.sparse_linear_multi_kernel.default, (x[:1], [w, w[:4]], 7, [b, None])),
        (C.call_ternary_linear_multi, ops.ternary_linear_multi_kernel.default,
         (x[:1], [packed, p2], [scale, s2], [OUT, 5], 9, [None, torch.randn(5)])),
    ]


@pytest.mark.skipif(not _native.loaded(), reason="qsparse_kernels._C is not built")
def test_kernel_calls_equal_the_kernel_ops():
    assert backends.ops("cpu")["ternary_linear"] is _native._C.call_ternary_linear
    for call, op, args in _kernel_cases():
        got, want = call(*args), op(*args)
        if not isinstance(got, list):
            got, want = [got], [want]
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    x, w = torch.randn(2, D), torch.randn(OUT, D + 1)  # a kernel's own check: the same error
    with pytest.raises(RuntimeError, match="must equal d"):
        _native._C.call_sparse_linear(x, w, 3, None)


@pytest.mark.skipif(not _native.loaded(), reason="qsparse_kernels._C is not built")
def test_kernel_calls_are_dispatched():
    """The typed calls go through the dispatcher: Python dispatch modes and the profiler see them."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for call, op, args in _kernel_cases():
        seen.clear()
        with Record():
            call(*args)
        assert str(op) in seen, (op, seen)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call(*args)
        assert op.name() in {e.key for e in prof.key_averages()}  # "qsparse::sparse_linear_kernel"


# ---- a converted Hugging Face model after planned calls ----


@pytest.mark.parametrize("config", [qk.QSparseConfig(sparsity=0.5),
                                    qk.QSparseConfig(sparsity=0.6, weights="ternary", pack=True)])
def test_hf_model_after_generate_saves_moves_and_loads(tmp_path, config):
    """generate() leaves plans in every layer and group; save_pretrained / from_pretrained, .to()
    and a second generate() give what a model that never planned gives."""
    transformers = pytest.importorskip("transformers")
    from tests.test_hf_models import DECODER_KW

    torch.manual_seed(3)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER_KW)).eval()
    model = qk.convert(copy.deepcopy(base), config)
    ids = torch.randint(0, DECODER_KW["vocab_size"], (1, 5))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        first = model.generate(ids, **kw)
        layer = model.model.layers[0]
        assert layer.self_attn.q_proj._siblings._plan is not None and layer.self_attn.o_proj._plan is not None
        assert torch.equal(model.generate(ids, **kw), first)  # the planned calls
        model.save_pretrained(tmp_path)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert torch.equal(loaded.generate(ids, **kw), first)
        model.to(torch.bfloat16)
        fresh = qk.convert(copy.deepcopy(base), config).to(torch.bfloat16)
        assert torch.equal(model(ids).logits, fresh(ids).logits)
