"""The CPU attention kernel (csrc/cpu/attention.cpp) behind qsparse_kernels.attention for float32,
bf16 and fp16: decode steps (one query position) and prefills (several, causal or masked) against float64
SDPA on every ISA path (GQA, MHA, more query heads per key-value head than the vector paths take,
odd head dims, query and key counts, value dims other than the key's, strided inputs, boolean /
additive / per-head / per-position / float32 masks, fully masked rows, batch 1 and > 1), opcheck,
bad input, thread counts, which calls take it, and padded batches through transformers."""

import pytest
import torch
import torch.nn.functional as F

import qsparse_kernels as qk
from qsparse_kernels import _native, attention
from tests.cpu_flags import ISAS, with_isa
from tests.numerics import FLOAT_DTYPES, rel_err

pytestmark = pytest.mark.skipif(not qk.backend_info()["cpu"]["usable"], reason="cpu backend not built")

# (batch, query heads, key-value heads, queries, keys, head dim, value dim)
CASES = [
    (1, 4, 2, 1, 1, 16, 16),
    (1, 32, 4, 1, 7, 64, 64),
    (3, 32, 4, 1, 145, 64, 64),
    (2, 6, 6, 1, 63, 40, 24),
    (1, 12, 1, 1, 33, 130, 130),
    (2, 72, 1, 1, 9, 16, 16),  # 72 query heads to one key-value head (the vector paths take up to 64)
    (1, 8, 2, 1, 4097, 32, 32),
    (1, 32, 4, 128, 128, 64, 64),  # TinyLlama's prefill: chunks of 8 positions x 8 heads
    (2, 32, 4, 7, 7, 64, 64),
    (1, 32, 4, 5, 9, 64, 64),  # fewer queries than keys (causal: top-left, as torch)
    (1, 4, 2, 9, 5, 16, 16),  # more queries than keys
    (2, 6, 6, 63, 63, 40, 24),  # MHA: chunks of 64 positions
    (1, 72, 1, 9, 9, 16, 16),
    (1, 8, 2, 9, 1031, 32, 32),
]


def _kernel(q, k, v, m=None, scale=0.125, causal=False):
    return torch.ops.qsparse.attention_kernel(q, k, v, m, scale, causal)


def _inputs(case, dtype, gen):
    B, H, Hkv, T, L, E, Ev = case
    q = torch.randn(B, H, T, E, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, E, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, Ev, generator=gen).to(dtype)
    return q, k, v


def _ref64(q, k, v, m, scale, causal=False):
    m = m.double() if m is not None and m.is_floating_point() else m
    if m is not None:  # the kernel takes any broadcastable mask; torch's SDPA at least 2-D
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), m, scale=scale, is_causal=causal,
                                          enable_gqa=True)


def _close(y, ref):
    """Within one rounding of the output (it attends in float32), as test_attention's float32 path."""
    assert y.shape == ref.shape and torch.isfinite(y).all()
    bound = torch.finfo(y.dtype).eps / 2 + 1e-5 if y.dtype != torch.float32 else 1e-5
    assert rel_err(y, ref) <= bound


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_matches_float64(case, dtype, isa, causal, gen):
    q, k, v = _inputs(case, dtype, gen)
    scale = 1 / case[5] ** 0.5
    y = with_isa(isa, lambda: _kernel(q, k, v, None, scale, causal))
    assert y.dtype == dtype
    _close(y, _ref64(q, k, v, None, scale, causal))


def _masks(B, H, T, L, dtype, gen):
    keep = torch.rand(B, 1, T, L, generator=gen) < 0.6
    keep[..., -1] = True  # the newest key is always seen: no fully masked row here
    per_head = torch.randn(B, H, T, L, generator=gen)
    return {
        "bool": keep,
        "bool, one row for every position": keep[:, :, :1],
        "additive": torch.zeros(B, 1, T, L).masked_fill(~keep, float("-inf")).to(dtype),
        "per-head float32": per_head,
        "per-head bool": (per_head > 0) | (torch.arange(L) == L - 1),
        "2-D": keep[0, 0],
        "1-D": keep[0, 0, 0],
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_masks(dtype, isa, gen):
    cases = [(2, 32, 4, 1, 37, 64, 64), (3, 6, 2, 1, 5, 24, 24), (2, 32, 4, 11, 37, 64, 64), (1, 6, 6, 70, 70, 8, 8)]
    for case in cases:
        q, k, v = _inputs(case, dtype, gen)
        for m in _masks(case[0], case[1], case[3], case[4], dtype, gen).values():
            y = with_isa(isa, lambda q=q, k=k, v=v, m=m: _kernel(q, k, v, m, 0.2))
            _close(y, _ref64(q, k, v, m, 0.2))


@pytest.mark.parametrize("isa", ISAS)
def test_fully_masked_rows_give_zero_as_torch(isa, gen):
    q, k, v = _inputs((2, 4, 2, 3, 6, 16, 16), torch.bfloat16, gen)
    m = torch.ones(2, 1, 3, 6, dtype=torch.bool)
    m[1] = False  # batch row 1: every position
    m[0, :, 1] = False  # batch row 0: position 1
    y = with_isa(isa, lambda: _kernel(q, k, v, m))
    assert y[1].eq(0).all() and y[0, :, 1].eq(0).all()
    assert torch.equal(y[1], F.scaled_dot_product_attention(q, k, v, m, scale=0.125, enable_gqa=True)[1])
    keep = [0, 2]
    _close(y[:1, :, keep], _ref64(q[:1, :, keep], k[:1], v[:1], m[:1, :, keep], 0.125))


@pytest.mark.parametrize("T", [1, 5])
def test_kernel_takes_strided_inputs(T, gen):
    """A cache slice of a longer buffer, a query of some heads (and positions of HF's [B, T, H, E]
    projection output, transposed), a non-contiguous head dim."""
    cache = torch.randn(2, 4, 50, 64, generator=gen).bfloat16()
    k, v = cache[:, :, :19], cache.flip(2)[:, :, :19]
    q = torch.randn(2, T, 40, 64, generator=gen).bfloat16().transpose(1, 2)[:, 4:36]  # 32 of 40 heads
    assert not k.is_contiguous() and not q.is_contiguous()
    for causal in (False, True):
        want = _kernel(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal)
        assert torch.equal(_kernel(q, k, v, causal=causal), want)
    kt = torch.randn(2, 4, 64, 19, generator=gen).bfloat16().transpose(2, 3)  # stride(-1) != 1
    assert torch.equal(_kernel(q, kt, v), _kernel(q, kt.contiguous(), v))


@pytest.mark.parametrize("T", [1, 40])
def test_threads_agree(T, gen):
    q, k, v = _inputs((3, 32, 4, T, 300, 64, 64), torch.bfloat16, gen)
    want = _kernel(q, k, v, causal=T > 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(_kernel(q, k, v, causal=T > 1), want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(dtype, gen):
    q, k, v = _inputs((2, 8, 2, 3, 9, 16, 16), dtype, gen)
    m = torch.rand(2, 1, 3, 9, generator=gen) < 0.7
    for mask, causal in ((None, False), (m, False), (None, True)):
        torch.library.opcheck(torch.ops.qsparse.attention_kernel.default, (q, k, v, mask, 0.25, causal))


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 4, 1, 8), (1, 3, 5, 8), (1, 3, 5, 8)), "multiple of"),
        (((1, 4, 1, 8), (1, 2, 5, 6), (1, 2, 5, 8)), "one head dim"),
        (((1, 4, 1, 8), (1, 2, 5, 8), (1, 2, 4, 8)), "one key count"),
        (((2, 4, 1, 8), (1, 2, 5, 8), (1, 2, 5, 8)), "one batch size"),
        (((4, 1, 8), (1, 2, 5, 8), (1, 2, 5, 8)), "4-D"),
    ],
)
def test_kernel_rejects_bad_shapes(shapes, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(RuntimeError, match=match):
        _kernel(q, k, v)


def test_kernel_rejects_bad_masks_and_dtypes():
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        _kernel(q, k, v, torch.ones(1, 1, 2, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="does not broadcast"):
        _kernel(q, k, v, torch.ones(1, 1, 3, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="a mask or is_causal, not both"):
        _kernel(q, k, v, torch.ones(1, 1, 2, 5, dtype=torch.bool), causal=True)
    with pytest.raises(RuntimeError, match="bool, float32 or q's dtype"):
        _kernel(q, k, v, torch.ones(1, 1, 1, 5, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="one dtype"):
        _kernel(q, k.double(), v)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        _kernel(q, k, v, None, float("nan"))


# ---- which calls take it ----
def _count(monkeypatch):
    calls = []
    kernel = _native._C.call_attention
    monkeypatch.setattr(_native._C, "call_attention", lambda *a: calls.append(a[0].shape[2]) or kernel(*a))
    return calls  # the query count of each call


def test_portable_path_is_not_routed(monkeypatch, gen):
    """Without a vector path (the portable code, slower than the cast path) sdpa casts to float32
    instead: the same result as that path, bit for bit, and no kernel call."""
    calls = _count(monkeypatch)
    q, k, v = _inputs((1, 8, 2, 3, 12, 16, 16), torch.bfloat16, gen)
    for causal in (False, True):
        cast = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal,
                                              enable_gqa=True).to(q.dtype)
        with torch.no_grad():
            got = with_isa("scalar", lambda c=causal: attention.sdpa(q, k, v, is_causal=c, enable_gqa=True))
        assert torch.equal(got, cast)
    assert calls == []


@pytest.mark.skipif(_native._C is None or _native._C.cpu_isa() == "scalar", reason="routed with AVX2 / AVX-512")
def test_sdpa_routes_to_the_kernel(monkeypatch, gen):
    calls = _count(monkeypatch)
    q, k, v = _inputs((1, 8, 2, 1, 12, 16, 16), torch.bfloat16, gen)
    q3 = torch.randn(1, 8, 3, 16, generator=gen).bfloat16()
    with torch.no_grad():
        y = attention.sdpa(q, k, v, enable_gqa=True)
        assert calls == [1] and torch.equal(y, _kernel(q, k, v, None, 0.25))
        y3 = attention.sdpa(q3, k, v, is_causal=True, enable_gqa=True)  # a prefill, top-left causal
        assert calls == [1, 3] and torch.equal(y3, _kernel(q3, k, v, None, 0.25, True))
        causal = attention.sdpa(q, k, v, is_causal=True, enable_gqa=True)  # one position: key 0 only
        assert calls == [1, 3, 1]
        attention.sdpa(q.double(), k.double(), v.double(), enable_gqa=True)  # float64: torch's SDPA
        y32 = attention.sdpa(q.float(), k.float(), v.float(), enable_gqa=True)  # float32: the kernel
        assert calls == [1, 3, 1, 1] and y32.dtype == torch.float32
        m = torch.ones(1, 1, 3, 12, dtype=torch.bool)
        with pytest.raises(RuntimeError):  # a mask and is_causal: torch's error, from the cast path
            attention.sdpa(q3, k, v, m, is_causal=True, enable_gqa=True)
        assert calls == [1, 3, 1, 1]
    torch.testing.assert_close(causal, v[:, :, :1].repeat_interleave(4, 1).to(causal.dtype), rtol=0, atol=0)
    monkeypatch.setattr(attention, "_PREFILL_MAX_KEYS", 11)  # a prefill over more keys: the cast path
    with torch.no_grad():
        attention.sdpa(q3, k, v, is_causal=True, enable_gqa=True)
        attention.sdpa(q, k, v, enable_gqa=True)  # decode steps have no bound
    assert calls == [1, 3, 1, 1, 1]
    qg = q3.clone().requires_grad_()
    attention.sdpa(qg, k, v, is_causal=True, enable_gqa=True).sum().backward()  # autograd: torch's path
    assert calls == [1, 3, 1, 1, 1] and qg.grad is not None


@pytest.mark.skipif(_native._C is None or _native._C.cpu_isa() == "scalar", reason="routed with AVX2 / AVX-512")
def test_sdpa_compiles_with_the_kernel(gen):
    """torch.compile(fullgraph=True) traces the routing and the registered op (its fake)."""
    q, k, v = _inputs((2, 8, 2, 1, 9, 16, 16), torch.bfloat16, gen)
    m = torch.rand(2, 1, 1, 9, generator=gen) < 0.7
    m[..., -1] = True
    q3 = torch.randn(2, 8, 3, 16, generator=gen).bfloat16()
    compiled = torch.compile(attention.sdpa, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(q, k, v, m, enable_gqa=True), _kernel(q, k, v, m, 0.25))
        assert torch.equal(compiled(q3, k, v, is_causal=True, enable_gqa=True), _kernel(q3, k, v, None, 0.25, True))


@pytest.mark.skipif(_native._C is None or _native._C.cpu_isa() == "scalar", reason="routed with AVX2 / AVX-512")
def test_hf_attention_takes_the_kernel(monkeypatch, gen):
    calls = _count(monkeypatch)
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    module = transformers.LlamaForCausalLM(cfg).model.layers[0].self_attn
    q, k, v = _inputs((2, 4, 2, 1, 9, 16, 16), torch.bfloat16, gen)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :3] = False
    with torch.no_grad():
        y, w = attention.hf_attention(module, q, k, v, mask, dropout=0.0, scaling=module.scaling)
        assert calls == [1] and w is None and y.shape == (2, 1, 4, 16) and y.is_contiguous()
        _close(y, _ref64(q, k, v, mask, module.scaling).transpose(1, 2))
        attention.hf_attention(module, q, k, v, mask, dropout=0.1, scaling=module.scaling)  # dropout: not the kernel
        assert calls == [1]
        # A prefill without a mask is causal as in transformers, also with more keys than queries
        # (transformers drops the keys past the queries' count); is_causal=False is not.
        q5 = torch.randn(2, 4, 5, 16, generator=gen).bfloat16()
        for kw in ({}, {"is_causal": False}):
            for keys in (5, 9):
                y, _ = attention.hf_attention(module, q5, k[:, :, :keys], v[:, :, :keys], None, dropout=0.0,
                                              scaling=module.scaling, **kw)
                ref, _ = sdpa_attention_forward(module, q5.double(), k[:, :, :keys].double(),
                                                v[:, :, :keys].double(), None, dropout=0.0,
                                                scaling=module.scaling, **kw)
                _close(y, ref)
        assert calls == [1, 5, 5, 5, 5]


@pytest.mark.skipif(_native._C is None or _native._C.cpu_isa() == "scalar", reason="routed with AVX2 / AVX-512")
def test_padded_batch_runs_through_the_kernel(monkeypatch):
    """A left-padded bf16 batch through transformers: prefill and decode logits as with the kernel
    switched off (transformers' SDPA in float32), to bf16 noise; the padding mask reaches it."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = attention.use_cpu_attention(transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval())
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0

    def steps():
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            m2 = torch.cat([mask, torch.ones_like(nxt)], 1)
            return model(nxt, attention_mask=m2, past_key_values=out.past_key_values).logits

    calls = _count(monkeypatch)
    fast = steps()
    assert calls == [9, 9, 1, 1]  # the prefill (with the padding mask), then the decode step; per layer
    monkeypatch.setattr(attention, "_KERNEL", False)
    slow = steps()
    assert len(calls) == 4
    torch.testing.assert_close(fast.float(), slow.float(), rtol=0, atol=0.05)
