"""Sibling projections share one kernel call (issue 16): the multi-segment ops equal the single ops
bit for bit, converted HF Llama / Mistral / Qwen2 models give torch.equal outputs with and without
fusion, a decode step makes at most 4 linear-kernel calls per decoder layer, and every case where
siblings do not in fact get the same input falls back to separate calls."""

import copy
import pickle

import pytest
import torch
from torch import nn

import qsparse_kernels as qk
from qsparse_kernels import _native, sibling_ops
from qsparse_kernels import reference as R
from qsparse_kernels.nn import QSparseLinear, SiblingGroup
from tests.test_hf_models import DECODER_KW, DECODERS  # the same tiny HF decoders

pytestmark = pytest.mark.skipif(not _native.loaded(), reason="qsparse_kernels._C is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = ["scalar", "avx2", "avx512"]
SPARSE_MULTI = None if not _native.loaded() else torch.ops.qsparse.sparse_linear_multi_kernel.default
TERNARY_MULTI = None if not _native.loaded() else torch.ops.qsparse.ternary_linear_multi_kernel.default
SPARSE_ONE = None if not _native.loaded() else torch.ops.qsparse.sparse_linear_kernel.default
TERNARY_ONE = None if not _native.loaded() else torch.ops.qsparse.ternary_linear_kernel.default


@pytest.fixture(params=ISAS)
def isa(request):
    _native._C.set_cpu_isa_cap(request.param)
    request.addfinalizer(lambda: _native._C.set_cpu_isa_cap(""))
    return request.param


def assert_identical(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ---- the native ops against the single ops ----

# (d, [out_features of each segment]): 1, 7, 63, 4097 wide; segments narrower and wider than a
# panel / strip / the row split's block; a segment of 0 outputs.
SEGMENTS = [(1, [1, 7]), (7, [63, 1, 7]), (63, [4097, 7, 63]), (257, [130, 0, 33]), (4097, [63, 7])]


def _ks(d):
    return sorted({0, 1, d // 3, d})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,outs", SEGMENTS)
@pytest.mark.parametrize("rows", [1, 3])
def test_sparse_multi_equals_single(isa, threads, dtype, d, outs, rows):
    x = torch.randn(rows, d).to(dtype)
    ws = [qk.to_fast_layout(torch.randn(n, d).to(dtype)) for n in outs]
    bs = [torch.randn(n).to(dtype) if i % 2 == 0 else None for i, n in enumerate(outs)]
    for k in _ks(d):
        got = SPARSE_MULTI(x, ws, k, bs)
        assert len(got) == len(outs)
        for g, w, b in zip(got, ws, bs, strict=True):
            assert_identical(g, SPARSE_ONE(x, w, k, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap", ["amx", "avx512bf16", "avx512"])
@pytest.mark.parametrize("rows", [2, 9, 16, 20])
def test_sparse_multi_rows_share_one_selection(cap, threads, rows, dtype):
    """Several rows: one top-K for every segment, then each segment's own path (the batched bf16
    kernel up to its row limit, torch's GEMM on the masked rows above it, for fp16 above 16 rows
    where torch's fp16 GEMM is fast, or for a row-major weight): bit-identical to the single op
    per segment."""
    _native._C.set_cpu_isa_cap(cap)
    try:
        d = 300
        x = torch.randn(1, rows, d).to(dtype)
        ws = [qk.to_fast_layout(torch.randn(70, d).to(dtype)), torch.randn(33, d).to(dtype)]
        bs = [torch.randn(70).to(dtype), None]
        for k in (1, 100, d - 1):
            got = SPARSE_MULTI(x, ws, k, bs)
            for g, w, b in zip(got, ws, bs, strict=True):
                assert_identical(g, SPARSE_ONE(x, w, k, b))
    finally:
        _native._C.set_cpu_isa_cap("")


def test_sparse_multi_row_major_and_leading_dims():
    d = 40
    x = torch.randn(1, 1, d)
    ws = [torch.randn(24, d), qk.to_fast_layout(torch.randn(8, d))]  # a row-major weight: per-segment path
    bs = [None, torch.randn(8)]
    got = SPARSE_MULTI(x, ws, 9, bs)
    assert [g.shape for g in got] == [(1, 1, 24), (1, 1, 8)]
    for g, w, b in zip(got, ws, bs, strict=True):
        assert_identical(g, SPARSE_ONE(x, w, 9, b))
    xt = torch.randn(d, 1).t()  # a non-contiguous single row
    w = qk.to_fast_layout(torch.randn(16, d))
    assert_identical(SPARSE_MULTI(xt, [w, w], 5, [None, None])[1], SPARSE_ONE(xt, w, 5, None))


def _packed(out_f, d):
    w = torch.randn(out_f, d)
    return qk.quantize_weight_ternary(w) if out_f > 0 else (R.pack_ternary(torch.zeros(0, d, dtype=torch.int8)),
                                                           torch.tensor(0.7))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,outs", SEGMENTS)
@pytest.mark.parametrize("rows", [1, 3])
def test_ternary_multi_equals_single(isa, threads, dtype, d, outs, rows):
    x = torch.randn(rows, d).to(dtype)
    if rows == 1 and d >= 7:
        x[0, 3] = float("nan")  # a NaN row: NaN outputs when it is kept
    segs = [_packed(n, d) for n in outs]
    bs = [torch.randn(n).to(dtype) if i % 2 == 1 else None for i, n in enumerate(outs)]
    for k in [None, *_ks(d)]:
        got = TERNARY_MULTI(x, [p for p, _ in segs], [s for _, s in segs], outs, k, bs)
        for g, (p, s), n, b in zip(got, segs, outs, bs, strict=True):
            assert_identical(g, TERNARY_ONE(x, p, s, n, k, b))


def _side_by_side(segs):
    """The packed weights of segs as column ranges of one buffer, in order (store_side_by_side)."""
    cat = torch.cat([p for p, _ in segs], dim=1)
    views, at = [], 0
    for p, _ in segs:
        views.append(cat[:, at : at + p.shape[1]])
        at += p.shape[1]
    return views


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,outs", [(7, [63, 1, 7]), (63, [4097, 7, 63]), (257, [130, 0, 33]), (300, [2048, 256, 258])])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_ternary_multi_side_by_side_equals_single(isa, threads, dtype, d, outs, rows):
    """Segments stored side by side are read as one wider weight at M == 1 (one run of bytes per
    kept row, padding codes of a segment's last byte in the middle of it): bit-identical to the
    single op on each segment's own contiguous copy, as are the batch paths over the views."""
    x = torch.randn(rows, d).to(dtype)
    segs = [_packed(n, d) for n in outs]
    views = _side_by_side(segs)
    bs = [torch.randn(n).to(dtype) if i % 2 == 0 else None for i, n in enumerate(outs)]
    for k in [None, *_ks(d)]:
        got = TERNARY_MULTI(x, views, [s for _, s in segs], outs, k, bs)
        for g, (p, s), n, b in zip(got, segs, outs, bs, strict=True):
            assert_identical(g, TERNARY_ONE(x, p, s, n, k, b))


@pytest.mark.parametrize("cap", ["amx", "avx512"])
@pytest.mark.parametrize("rows", [2, 8, 16, 20])
def test_ternary_multi_rows_share_one_preparation(cap, threads, rows):
    """Several rows: one top-K + int8 quantization for every segment, then each segment's own path
    (the AMX-INT8 batch kernel from 8 / 16 rows where the CPU has it, the strip kernels below):
    bit-identical to the single op per segment, NaN rows included."""
    _native._C.set_cpu_isa_cap(cap)
    try:
        d = 300
        x = torch.randn(1, rows, d).to(torch.bfloat16)
        x[0, rows // 2, 7] = float("nan")
        segs = [_packed(n, d) for n in (70, 33)]
        bs = [torch.randn(70).to(torch.bfloat16), None]
        for k in (None, 0, 1, 100, d):
            got = TERNARY_MULTI(x, [p for p, _ in segs], [s for _, s in segs], [70, 33], k, bs)
            for g, (p, s), n, b in zip(got, segs, (70, 33), bs, strict=True):
                assert_identical(g, TERNARY_ONE(x, p, s, n, k, b))
    finally:
        _native._C.set_cpu_isa_cap("")


@pytest.mark.parametrize("rows", [1, 3])
def test_multi_kernels_check_arguments(rows):
    x = torch.randn(rows, 8)
    w = qk.to_fast_layout(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="2 weights but 1 biases"):
        SPARSE_MULTI(x, [w, w], 3, [None])
    with pytest.raises(RuntimeError, match="weight.size\\(1\\)"):  # the single op's own error
        SPARSE_MULTI(x, [w, qk.to_fast_layout(torch.randn(4, 9))], 3, [None, None])
    packed, scale = _packed(4, 8)
    with pytest.raises(RuntimeError, match="one entry per segment"):
        TERNARY_MULTI(x, [packed], [scale, scale], [4], None, [None])
    with pytest.raises(RuntimeError, match="packed must have shape"):
        TERNARY_MULTI(x, [packed, packed], [scale, scale], [4, 9], None, [None, None])
    with pytest.raises(RuntimeError, match="scale must be a scalar tensor"):
        TERNARY_MULTI(x, [packed, packed], [scale, torch.ones(2)], [4, 4], 3, [None, None])


def test_opcheck_multi_kernels():
    d = 40
    x = torch.randn(1, d)
    ws = [qk.to_fast_layout(torch.randn(n, d)) for n in (13, 5)]
    torch.library.opcheck(SPARSE_MULTI, (x, ws, 7, [torch.randn(13), None]))
    for rows in (3, 9):
        xb = torch.randn(rows, d).bfloat16()
        torch.library.opcheck(SPARSE_MULTI, (xb, [w.bfloat16() for w in ws], 7, [None, None]))
    segs = [_packed(n, d) for n in (13, 5)]
    args = (x, [p for p, _ in segs], [s for _, s in segs], [13, 5], 9, [None, torch.randn(5)])
    torch.library.opcheck(TERNARY_MULTI, args)
    torch.library.opcheck(TERNARY_MULTI, (torch.randn(2, d).half(), *args[1:4], None, [None, None]))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_functional_multi_ops(backend):
    d = 33
    x = torch.randn(2, 1, d)
    ws = [qk.to_fast_layout(torch.randn(n, d)) for n in (9, 17)]
    got = sibling_ops.sparse_linear_multi(x, ws, 10, backend=backend)
    for g, w in zip(got, ws, strict=True):
        assert_identical(g, qk.sparse_linear(x, w, 10, backend=backend))
    segs = [_packed(n, d) for n in (9, 17)]
    got = sibling_ops.ternary_linear_multi(x, [p for p, _ in segs], [s for _, s in segs], [9, 17], 5, backend=backend)
    for g, (p, s), n in zip(got, segs, [9, 17], strict=True):
        assert_identical(g, qk.ternary_linear(x, p, s, n, 5, backend=backend))
    with pytest.raises(ValueError, match="biases must have one entry per segment"):
        sibling_ops.sparse_linear_multi(x, ws, 10, [None], backend=backend)
    # autograd: the differentiable single op per segment
    xg = x.clone().requires_grad_()
    sum(y.sum() for y in sibling_ops.sparse_linear_multi(xg, ws, 10, backend=backend)).backward()
    xr = x.clone().requires_grad_()
    sum(qk.sparse_linear(xr, w, 10, backend=backend).sum() for w in ws).backward()
    assert_identical(xg.grad, xr.grad)


def test_registered_multi_ops_opcheck():
    d = 24
    x = torch.randn(1, d)
    ws = [qk.to_fast_layout(torch.randn(n, d)) for n in (8, 4)]
    op = torch.ops.qsparse.sparse_linear_multi.default
    torch.library.opcheck(op, (x, ws, 5, [None, torch.randn(4)], "auto"))
    segs = [_packed(n, d) for n in (8, 4)]
    top = torch.ops.qsparse.ternary_linear_multi.default
    torch.library.opcheck(top, (x, [p for p, _ in segs], [s for _, s in segs], [8, 4], 5, [None, None], "auto"))


# ---- converted Hugging Face models ----

def _config(mode):
    if mode == "qsparse":
        return qk.QSparseConfig(sparsity=0.5)
    if mode == "ternary-sparse":
        return qk.QSparseConfig(sparsity=0.6, weights="ternary", pack=True)
    # k = in_features of q/k/v/gate/up: dense activations there
    return qk.QSparseConfig(layers={"*": {"weights": "ternary", "pack": True, "k": DECODER_KW["hidden_size"]}})


def _pair(kind, mode, dtype):
    """(fused, unfused) converted copies of one random tiny model."""
    cfg_cls, model_cls = DECODERS[kind]
    base = model_cls(cfg_cls(**DECODER_KW)).eval().to(dtype)
    fused, plain = copy.deepcopy(base), copy.deepcopy(base)
    fused, report = qk.convert(fused, _config(mode), return_report=True)
    plain = qk.convert(plain, _config(mode), fuse_siblings=False)
    assert len(report.sibling_groups) == 2 * DECODER_KW["num_hidden_layers"]
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in report.sibling_groups
    assert "model.layers.1.mlp.{gate_proj,up_proj}" in report.sibling_groups
    assert "sibling groups sharing one kernel call: 4" in str(report)
    return fused, plain


def _decode_logits(model, ids, steps=3):
    """Prefill (M = len(ids)) then `steps` greedy decode steps (M = 1) with the KV cache."""
    out = model(ids, use_cache=True)
    logits, past = [out.logits], out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(nxt, past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return logits


def _groups(model):
    return {id(m._siblings): m._siblings for m in model.modules() if getattr(m, "_siblings", None) is not None}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kind", list(DECODERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["qsparse", "ternary-sparse", "ternary-dense"])
def test_hf_fused_equals_unfused(one_thread, kind, dtype, mode):
    fused, plain = _pair(kind, mode, dtype)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        a, b = _decode_logits(fused, ids), _decode_logits(plain, ids)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    groups = _groups(fused)
    assert len(groups) == 4 and not any(g.disabled for g in groups.values())
    with torch.no_grad():  # the fused path did run: one multi call per group in a decode step
        calls = _linear_kernel_calls(lambda: fused(ids[:, :1]))
    assert sum("multi" in n for n in calls) == 4, calls
    assert not _groups(plain)
    with torch.inference_mode():  # inference tensors (no version counter) fuse too
        a = _decode_logits(fused, ids, steps=1)
    for x, y in zip(a, b, strict=False):
        assert torch.equal(x, y)
    assert not any(g.disabled for g in groups.values())


def _linear_kernel_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return [n for n in names if n.startswith("qsparse::") and "linear" in n and n.endswith("_kernel")]


@pytest.mark.parametrize("mode", ["qsparse", "ternary-sparse"])
def test_decode_makes_at_most_4_kernel_calls_per_layer(one_thread, mode):
    fused, plain = _pair("llama", mode, torch.bfloat16)
    ids = torch.randint(0, 96, (1, 4))
    nxt = torch.randint(0, 96, (1, 1))
    with torch.no_grad():
        past = fused(ids, use_cache=True).past_key_values
        calls = _linear_kernel_calls(lambda: fused(nxt, past_key_values=past, use_cache=True))
        past = plain(ids, use_cache=True).past_key_values
        calls_plain = _linear_kernel_calls(lambda: plain(nxt, past_key_values=past, use_cache=True))
    layers = DECODER_KW["num_hidden_layers"]
    assert len(calls) == 4 * layers + 1, calls  # + the dense head (DenseHead)
    assert sum("multi" in n for n in calls) == 2 * layers
    assert len(calls_plain) == 7 * layers + 1, calls_plain


# ---- fallbacks: the siblings do not get the same input ----


class Attn(nn.Module):
    """q/k/v siblings with a configurable forward (what a model might do)."""

    def __init__(self, d=32, how="same"):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, 16), nn.Linear(d, 8), nn.Linear(d, 8, bias=False)
        self.how = how

    def forward(self, x):
        q = self.q_proj(x)
        if self.how == "different":
            k = self.k_proj(x + 1)
        elif self.how == "inplace":
            x.mul_(2)
            k = self.k_proj(x)
        elif self.how == "twice":
            q = q + self.q_proj(x)
            k = self.k_proj(x)
        elif self.how == "skip_v":
            return torch.cat([q, self.k_proj(x)], -1)
        else:
            k = self.k_proj(x)
        return torch.cat([q, k, self.v_proj(x)], -1)


def _attn_pair(how, config=None):
    base = Attn(how=how).eval()
    config = config or qk.QSparseConfig(sparsity=0.5)
    fused = qk.convert(copy.deepcopy(base), config)
    plain = qk.convert(copy.deepcopy(base), config, fuse_siblings=False)
    assert isinstance(fused.q_proj._siblings, SiblingGroup)
    return fused, plain


@pytest.mark.parametrize("how", ["same", "different", "inplace", "twice"])
@pytest.mark.parametrize("ternary", [False, True])
def test_fallback_when_inputs_differ(how, ternary):
    config = qk.QSparseConfig(sparsity=0.5, weights="ternary", pack=True) if ternary else None
    fused, plain = _attn_pair(how, config)
    group = fused.q_proj._siblings
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 32)
            assert torch.equal(fused(x.clone()), plain(x.clone()))
    # Siblings that never share the input stop fusing (sticky); the others keep fusing.
    assert group.disabled == (how in ("different", "inplace"))
    assert getattr(group._local, "pending", None) is None or how != "same"


def test_fallback_pre_hook_changes_k_input():
    fused, plain = _pair("llama", "qsparse", torch.float32)
    for m in (fused, plain):
        m.model.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        for x, y in zip(_decode_logits(fused, ids), _decode_logits(plain, ids), strict=True):
            assert torch.equal(x, y)
    assert fused.model.layers[0].self_attn.k_proj._siblings.disabled
    assert not fused.model.layers[0].mlp.gate_proj._siblings.disabled
    assert not fused.model.layers[1].self_attn.k_proj._siblings.disabled


def test_unconsumed_result_is_released_and_stops_fusing():
    fused, plain = _attn_pair("skip_v")
    group = fused.q_proj._siblings
    with torch.no_grad():
        x = torch.randn(1, 32)
        assert torch.equal(fused(x), plain(x))
        assert group._local.pending is not None  # v's output waits
        assert torch.equal(fused(x.clone()), plain(x))
    assert group.disabled and group._local.pending is None


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_training_and_autograd_fall_back(kind):
    fused, plain = _pair(kind, "qsparse", torch.float32)
    ids = torch.randint(0, 96, (2, 5))
    for train in (True, False):  # training mode; then eval with autograd on
        fused.train(train), plain.train(train)
        la, lb = fused(ids, labels=ids).loss, plain(ids, labels=ids).loss
        assert torch.equal(la, lb)
        la.backward(), lb.backward()
        for (na, pa), (nb, pb) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
            assert na == nb and torch.equal(pa.grad, pb.grad), na
        fused.zero_grad(), plain.zero_grad()
    assert not any(g.disabled for g in _groups(fused).values())


def test_modes_and_autocast_fall_back():
    fused, plain = _attn_pair("same")
    x = torch.randn(3, 32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(fused(x), plain(x))
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Count():
            assert torch.equal(fused(x), plain(x))
    assert getattr(fused.q_proj._siblings._local, "pending", None) is None


def test_torch_compile_falls_back():
    fused, plain = _attn_pair("same")
    x = torch.randn(1, 32)
    with torch.no_grad():
        got = torch.compile(fused, backend="eager", fullgraph=False)(x)
        assert torch.equal(got, plain(x))


def test_mismatched_settings_fall_back():
    fused, plain = _attn_pair("same")
    fused.k_proj.sparsity = plain.k_proj.sparsity = 0.25  # changed after convert
    fused.v_proj.to(torch.float64)  # an input the layer would refuse: the error is the layer's own
    with torch.no_grad():
        x = torch.randn(1, 32)
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            fused(x)
        fused.v_proj.to(torch.float32)
        assert torch.equal(fused(x), plain(x))
    assert getattr(fused.q_proj._siblings._local, "pending", None) is None


def test_fuse_siblings_false_and_groups():
    fused, plain = _attn_pair("same")
    assert all(m._siblings is None for m in plain.modules() if isinstance(m, QSparseLinear))
    assert fused.q_proj._siblings is fused.k_proj._siblings is fused.v_proj._siblings
    assert len(fused.q_proj._siblings.members) == 3
    # different settings: no group
    base = Attn()
    m = qk.convert(base, qk.QSparseConfig(layers={"v_proj": 0.3, "*": 0.5}))
    assert m.q_proj._siblings is m.k_proj._siblings and m.v_proj._siblings is None


# ---- what the rest of the library sees is unchanged ----


@pytest.mark.parametrize("mode", ["qsparse", "ternary-sparse"])
def test_state_dict_checkpoint_unconvert_copy(tmp_path, mode):
    fused, plain = _pair("qwen2", mode, torch.float32)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in plain.named_buffers()]
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        want = plain(ids).logits
        qk.save_checkpoint(fused, tmp_path / "m.safetensors")
        qk.load_checkpoint(plain, tmp_path / "m.safetensors")
        assert torch.equal(plain(ids).logits, want)
        fused.save_pretrained(tmp_path / "hf")
        for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert torch.equal(clone(ids).logits, want)
            g = clone.model.layers[0].self_attn.q_proj._siblings
            assert g is not fused.model.layers[0].self_attn.q_proj._siblings
            assert all(m._siblings is g for m in g.members)
        assert torch.equal(fused.to(torch.float64).to(torch.float32)(ids).logits, want)
    if mode == "qsparse":
        lin = qk.unconvert(fused)
        assert not _groups(lin)
        assert all(type(m) is nn.Linear for n, m in lin.named_modules() if n.endswith("proj"))


def test_packed_siblings_stored_side_by_side(tmp_path):
    """convert() stores packed BitLinear siblings on the CPU as column ranges of one buffer (no
    more memory); state_dict gives contiguous copies, load_state_dict writes through the views,
    and a layer whose buffer was replaced still gives the same outputs (unmerged)."""
    fused, plain = _pair("llama", "ternary-sparse", torch.float32)
    attn = fused.model.layers[0].self_attn
    q, k, v = (attn.q_proj.packed, attn.k_proj.packed, attn.v_proj.packed)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.data_ptr() == q.data_ptr() + q.shape[1] and v.data_ptr() == k.data_ptr() + k.shape[1]
    assert q.stride(0) == q.shape[1] + k.shape[1] + v.shape[1]
    mlp = fused.model.layers[1].mlp
    assert mlp.up_proj.packed.data_ptr() == mlp.gate_proj.packed.data_ptr() + mlp.gate_proj.packed.shape[1]
    assert torch.equal(attn.k_proj.packed, plain.model.layers[0].self_attn.k_proj.packed)
    sd = fused.state_dict()
    assert all(t.is_contiguous() for t in sd.values())
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        want = plain(ids).logits
        assert torch.equal(fused(ids).logits, want)
        fused.load_state_dict({n: t.clone() for n, t in sd.items()})
        assert attn.k_proj.packed.data_ptr() == q.data_ptr() + q.shape[1]  # still the views
        assert torch.equal(fused(ids).logits, want)
        attn.k_proj.packed = attn.k_proj.packed.contiguous()  # no longer side by side
        assert torch.equal(fused(ids).logits, want)
        assert torch.equal(_decode_logits(fused, ids)[-1], _decode_logits(plain, ids)[-1])


def test_siblings_packed_after_convert_are_stored_side_by_side():
    """convert() of training-mode BitLinear layers groups them unpacked; packing the last sibling
    stores the group side by side, with the outputs of separately packed layers."""
    fused, plain = _attn_pair("same", qk.QSparseConfig(sparsity=0.5, weights="ternary"))
    q, k, v = fused.q_proj, fused.k_proj, fused.v_proj
    q.pack()
    k.pack()
    assert k.packed.data_ptr() != q.packed.data_ptr() + q.packed.shape[1]  # v is not packed yet
    v.pack()
    assert k.packed.data_ptr() == q.packed.data_ptr() + q.packed.shape[1]
    assert v.packed.data_ptr() == k.packed.data_ptr() + k.packed.shape[1]
    for m in plain.modules():
        if isinstance(m, qk.nn.BitLinear):
            m.pack()
    for x in (torch.randn(1, q.in_features), torch.randn(5, q.in_features)):
        with torch.no_grad():
            assert torch.equal(fused(x), plain(x))


@pytest.mark.parametrize("cap", ["avx2", "avx512"])
def test_side_by_side_only_within_the_m1_block(cap):
    """store_side_by_side leaves a group alone when its merged rows are wider than the CPU's M = 1
    pass reads at once (each layer would then read every other run of bytes)."""
    from qsparse_kernels.nn._siblings import store_side_by_side

    _native._C.set_cpu_isa_cap(cap)
    try:
        limit = _native._C.cpu_ternary_merge_max_bytes()
        assert limit == (3072 if cap == "avx2" else 8192)
        for out in (4 * 1536, 4 * 1537):  # two layers of 1536 / 1537 bytes per row under AVX2
            layers = [qk.nn.BitLinear(8, out).pack() for _ in range(2)]
            stored = store_side_by_side(layers)
            assert stored == (2 * out // 4 <= limit)
            a, b = (m.packed for m in layers)
            assert (b.data_ptr() == a.data_ptr() + a.shape[1]) == stored
    finally:
        _native._C.set_cpu_isa_cap("")


def test_unconvert_part_dissolves_the_group():
    fused, plain = _attn_pair("same")
    qk.unconvert(fused, filter_fn=lambda m, n: n == "v_proj")
    assert fused.q_proj._siblings is None and fused.k_proj._siblings is None
    with torch.no_grad():
        x = torch.randn(1, 32)
        qk.unconvert(plain, filter_fn=lambda m, n: n == "v_proj")
        assert torch.equal(fused(x), plain(x))


def test_convert_keeps_each_layers_train_mode():
    """Converted layers take the replaced Linear's mode: an eval model stays in eval (and fuses).
    Before, every new layer was in training mode, so an eval model never fused."""
    base = Attn().eval()
    base.v_proj.train()
    m = qk.convert(base, qk.QSparseConfig(sparsity=0.5))
    assert not m.q_proj.training and not m.k_proj.training and m.v_proj.training


@pytest.mark.parametrize("mode", ["qsparse", "ternary-sparse"])
def test_generate_and_compact_llama(one_thread, mode):
    """HF generate() and the decode benchmark's compact Llama (inference_mode) fuse and match."""
    from qsparse_kernels.bench.llama import LlamaDecoder, LlamaShape

    fused, plain = _pair("mistral", mode, torch.float32)
    ids = torch.randint(0, 96, (1, 5))
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(fused.generate(ids, **kw), plain.generate(ids, **kw))
    shape = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96)
    base = LlamaDecoder(shape).eval()
    a, rep = qk.convert(copy.deepcopy(base), _config(mode), return_report=True)
    b = qk.convert(copy.deepcopy(base), _config(mode), fuse_siblings=False)
    assert "layers.0.self_attn.{q_proj,k_proj,v_proj}" in rep.sibling_groups
    assert "layers.1.mlp.{gate_proj,up_proj}" in rep.sibling_groups
    assert torch.equal(a.generate(ids, 5), b.generate(ids, 5))
    calls = _linear_kernel_calls(lambda: a.generate(ids[:, :1], 1))
    assert sum("multi" in n for n in calls) == 4 and len(calls) == 4 * 2 + 1, calls  # + the dense head


def test_threads_have_their_own_cache():
    """Two threads run the same fused model at once: each takes the outputs of its own input."""
    import threading

    fused, plain = _attn_pair("same")
    xs = [torch.randn(1, 32) for _ in range(2)]
    want = [plain(x) for x in xs]
    got, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            with torch.no_grad():
                barrier.wait()
                for _ in range(200):
                    y = fused(xs[i])
                    if not torch.equal(y, want[i]):
                        got[i] = y
                        return
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [None, None]
    assert not fused.q_proj._siblings.disabled


def test_from_pretrained_groups_siblings(tmp_path):
    """A converted checkpoint loaded with from_pretrained fuses like the converted model."""
    from transformers import AutoModelForCausalLM

    fused, plain = _pair("llama", "ternary-sparse", torch.float32)
    fused.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(_groups(loaded)) == 4
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        for x, y in zip(_decode_logits(loaded, ids), _decode_logits(plain, ids), strict=True):
            assert torch.equal(x, y)
        calls = _linear_kernel_calls(lambda: loaded(ids[:, :1]))
    assert sum("multi" in n for n in calls) == 4, calls
