"""The HF generate() benchmark CLI runs every variant on a tiny Llama and prints its table."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from qsparse_kernels.bench import hf_generate  # noqa: E402
from qsparse_kernels.bench.llama import LlamaShape  # noqa: E402


@pytest.mark.parametrize(("dtype", "attention"), [(None, None), ("fp16", "sdpa"), ("fp32", None)])
def test_hf_generate_cli_tiny(tmp_path, capsys, dtype, attention):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}))
    assert hf_generate.main(["--hf-config", str(cfg), "--rounds", "2", "--new-tokens", "3",
                             "--prompt-len", "4", "9"] + (["--dtype", dtype] if dtype else [])
                            + (["--attention", attention] if attention else [])) == 0
    out = capsys.readouterr().out
    assert out.count(f"layers, {dtype or 'bf16'}, attention {attention or 'upcast'};") == 2
    rows = [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["hf"], ["compact"])]
    for v in hf_generate.DEFAULT_VARIANTS:  # HF and compact rows, two prompt lengths
        assert rows.count(["hf", v]) == 2 and rows.count(["compact", v]) == 2
    assert out.count("## prompt") == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_hf_model_has_the_requested_dtype(dtype):
    shape = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96)
    model = hf_generate.hf_model(shape, "qsparse-0.5", dtype=dtype)
    floats = [p for p in model.parameters() if p.is_floating_point()]
    assert floats and all(p.dtype == dtype for p in floats)


def test_hf_model_attention():
    """Dense and converted alike: ``upcast`` (the default) is qsparse_kernels.attention's, ``sdpa``
    transformers' own; anything else is refused."""
    from qsparse_kernels.attention import HF_NAME

    shape = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96)
    for variant in ("dense", "bitnet-b1.58"):
        assert hf_generate.hf_model(shape, variant).config._attn_implementation == HF_NAME
        assert hf_generate.hf_model(shape, variant, attention="sdpa").config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="attention: expected one of"):
        hf_generate.hf_model(shape, "dense", attention="eager")


def test_time_hf_generates_every_token_when_the_model_says_eos():
    """The end-of-sequence token is switched off for the timing (not forced away with a logits
    processor): a model that always predicts it still yields the requested tokens, and its own
    generation config is left as it was."""
    shape = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96)
    model = hf_generate.hf_model(shape, "dense", dtype=torch.float32)
    eos = model.generation_config.eos_token_id
    assert eos is not None
    model.lm_head.register_forward_hook(lambda mod, args, out: out.index_fill(-1, torch.tensor([eos]).flatten(), 1e4))
    prompt = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model.generate(prompt, max_new_tokens=5, do_sample=False).shape[1] == 5  # stops at once
        t = hf_generate.time_hf(model, prompt, 5)
    assert t["ms_per_token"] > 0 and t["prefill_ms"] > 0
    assert model.generation_config.eos_token_id == eos
