"""qsparse_kernels.attention: SDPA in float32 for float32 / bf16 / fp16 CPU inputs, and its
transformers attention function. Against float64 SDPA, by SPEC "Numerics"; transformers' masks (padding)."""

import pytest
import torch
import torch.nn.functional as F

from qsparse_kernels import attention
from tests.numerics import FLOAT_DTYPES, assert_parity, rel_err

# (batch, query heads, key-value heads, query positions, key positions, causal, mask)
CASES = [
    (1, 4, 2, 1, 1, False, None),
    (1, 4, 1, 1, 7, False, None),
    (2, 8, 2, 1, 63, False, None),
    (1, 32, 4, 1, 145, False, None),
    (1, 4, 4, 7, 7, True, None),
    (3, 4, 2, 5, 9, False, "bool"),
    (2, 6, 3, 4, 17, False, "float"),
]


def _inputs(case, dtype, gen):
    B, H, Hkv, T, L, causal, mask = case
    q = torch.randn(B, H, T, 64, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, 64, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, 64, generator=gen).to(dtype)
    m = None
    if mask is not None:
        keep = torch.rand(B, 1, T, L, generator=gen) < 0.7
        keep[..., 0] = True  # every query sees a key
        m = keep if mask == "bool" else torch.zeros(B, 1, T, L).masked_fill(~keep, -1e4).to(dtype)
    return q, k, v, m, causal


def _ref64(q, k, v, m, causal):
    m = m.double() if m is not None and m.is_floating_point() else m
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), m, is_causal=causal,
                                          enable_gqa=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_sdpa_matches_float64(case, dtype):
    """Within SPEC's parity of torch's SDPA in that dtype, and for bf16 / fp16 within one rounding of
    the output (it attends in float32): more accurate than the reduced-precision kernel."""
    q, k, v, m, causal = _inputs(case, dtype, torch.Generator().manual_seed(CASES.index(case)))
    y = attention.sdpa(q, k, v, m, is_causal=causal, enable_gqa=True)
    assert y.dtype == dtype and y.shape == q.shape
    plain = F.scaled_dot_product_attention(q, k, v, m, is_causal=causal, enable_gqa=True)
    ref = _ref64(q, k, v, m, causal)
    assert_parity(y, ref, plain)
    if dtype != torch.float32:
        assert rel_err(y, ref) <= torch.finfo(dtype).eps / 2 + 1e-5


def test_sdpa_scale_and_passthrough(monkeypatch):
    """``scale`` reaches the kernel; float64 inputs run torch's SDPA unchanged, and float32 ones too
    where the kernel does not take the call."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 3, 16, generator=gen) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    a, b, c = q.double(), k.double(), v.double()
    assert torch.equal(attention.sdpa(a, b, c, scale=0.3), F.scaled_dot_product_attention(a, b, c, scale=0.3))
    assert rel_err(attention.sdpa(q, k, v, scale=0.3), ref) < 1e-5
    assert rel_err(attention.sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.3), ref) < 2e-2
    monkeypatch.setattr(attention, "_KERNEL", False)
    assert torch.equal(attention.sdpa(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3))
    assert not attention.upcasts(q) and attention.upcasts(q.half()) and attention.upcasts(q.bfloat16())


transformers = pytest.importorskip("transformers")


FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def _decoder(dtype, family="llama"):
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    cfg = config_cls(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return model_cls(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hf_attention_matches_float64(dtype):
    """transformers' SDPA attention function's arguments (a boolean padding mask, GQA, scaling)
    -> within one rounding of float64, [B, T, H, E]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _decoder(dtype).model.layers[0].self_attn
    gen = torch.Generator().manual_seed(5)
    for T, L in ((1, 9), (6, 6)):
        q = torch.randn(2, 4, T, 16, generator=gen).to(dtype)
        k, v = (torch.randn(2, 2, L, 16, generator=gen).to(dtype) for _ in range(2))
        mask = torch.ones(2, 1, T, L, dtype=torch.bool).tril(L - T)
        mask[1, ..., :2] = False  # the second sequence is left-padded by 2
        mask[1, ..., -1] = True
        kw = {"scaling": module.scaling, "dropout": 0.0}
        y, w = attention.hf_attention(module, q, k, v, mask, **kw)
        ref, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), mask, **kw)
        assert w is None and y.dtype == dtype and y.shape == (2, T, 4, 16)
        assert rel_err(y, ref) <= torch.finfo(dtype).eps / 2 + 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_use_cpu_attention_keeps_padding_masks(family, monkeypatch):
    """In float32 without the kernel it is transformers' SDPA itself, so a left-padded batch's logits
    are equal: transformers builds the same masks for it (a custom name without a mask function
    gets none). With the kernel, equal to float32 rounding."""
    model = _decoder(torch.float32, family)
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        assert attention.use_cpu_attention(model) is model
        assert model.config._attn_implementation == attention.HF_NAME
        fast = model(ids, attention_mask=mask).logits
        monkeypatch.setattr(attention, "_KERNEL", False)
        got = model(ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    torch.testing.assert_close(fast, want, rtol=1e-4, atol=1e-5)


def test_use_cpu_attention_generates_in_bf16(tmp_path):
    """A converted bf16 model generates with it, and a saved copy loads with transformers' default."""
    import qsparse_kernels as qk

    model = qk.convert(_decoder(torch.bfloat16), qk.QSparseConfig(sparsity=0.5))
    attention.use_cpu_attention(model)
    prompt = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], prompt)
    model.save_pretrained(tmp_path)
    assert attention.HF_NAME not in (tmp_path / "config.json").read_text()


def test_use_cpu_attention_rejects_other_models():
    with pytest.raises(TypeError, match="model: expected a transformers PreTrainedModel"):
        attention.use_cpu_attention(torch.nn.Linear(2, 2))
