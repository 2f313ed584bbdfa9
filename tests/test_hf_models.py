"""Hugging Face transformers models (tiny configs, random weights, no hub): convert, run,
generate, fine-tune, checkpoint. transformers is an optional extra (``pip install .[hf]``)."""

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import qsparse_kernels as qk
from qsparse_kernels.nn import BitLinear, DenseHead, QSparseLinear
from tests.numerics import F32_REL, rel_err
from tests.test_convert import MISTRAL_RECIPE, PROJ_SPARSITY

VOCAB = 96
DECODER_KW = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
DECODERS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
BERT_KW = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CI machine OpenMP spinning
    makes them much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _decoder(kind):
    cfg_cls, model_cls = DECODERS[kind]
    return model_cls(cfg_cls(**DECODER_KW)).eval()


def _fine_tune(model, steps=6, lr=3e-3, **batch):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize(
    "kind, backend", [("llama", "reference"), ("llama", "auto"), ("mistral", "auto"), ("qwen2", "auto")]
)
def test_decoder_convert_generate_finetune(kind, backend):
    base = _decoder(kind)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = base(ids).logits

    dense = qk.convert(copy.deepcopy(base), qk.QSparseConfig(sparsity=0.0, backend=backend))
    with torch.no_grad():
        assert rel_err(dense(ids).logits, ref) <= F32_REL  # sparsity 0 is the original model

    model = qk.convert(copy.deepcopy(base), qk.QSparseConfig(sparsity=MISTRAL_RECIPE, backend=backend))
    converted = {n: m for n, m in model.named_modules() if isinstance(m, QSparseLinear)}
    assert len(converted) == 2 * 7 and type(model.lm_head) is DenseHead
    for name, m in converted.items():
        assert m.sparsity == PROJ_SPARSITY[name.rsplit(".", 1)[-1]] and m.backend == backend, name
    with torch.no_grad():
        y = model(ids).logits
    assert y.shape == ref.shape and torch.isfinite(y).all() and rel_err(y, ref) > 1e-3

    out = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)  # random weights: no EOS stop
    assert out.shape == (1, 18) and torch.equal(out[:, :12], ids[:1]) and int(out.max()) < VOCAB

    losses = _fine_tune(model, input_ids=ids, labels=ids)
    assert losses[-1] < losses[0], losses


def test_llama_ternary_finetune_pack_generate():
    model = qk.convert(_decoder("llama"), qk.QSparseConfig(sparsity=0.5, weights="ternary"))
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 14
    ids = torch.randint(0, VOCAB, (2, 12))
    losses = _fine_tune(model, input_ids=ids, labels=ids)
    assert losses[-1] < losses[0], losses
    for m in layers:
        m.pack()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 16)


def test_bert_classifier_convert_finetune():
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(num_labels=3, **BERT_KW)).eval()
    ids = torch.randint(0, VOCAB, (4, 10))
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        ref = base(ids).logits
    dense = qk.convert(copy.deepcopy(base), qk.QSparseConfig(sparsity=0.0))
    with torch.no_grad():
        assert rel_err(dense(ids).logits, ref) <= F32_REL

    cfg = qk.QSparseConfig(sparsity={"*.attention.self.*": 0.42, "*.output.dense": 0.6, "*": 0.4})
    model = qk.convert(copy.deepcopy(base), cfg)
    assert type(model.classifier) is DenseHead  # the head stays dense
    layer0 = model.bert.encoder.layer[0]
    assert layer0.attention.self.query.sparsity == 0.42 and layer0.attention.output.dense.sparsity == 0.6
    assert layer0.output.dense.sparsity == 0.6 and layer0.intermediate.dense.sparsity == 0.4
    assert model.bert.pooler.dense.sparsity == 0.4
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) > 1e-3
    losses = _fine_tune(model, steps=8, input_ids=ids, labels=labels)
    assert losses[-1] < losses[0], losses


def test_bert_mlm_tied_decoder_stays_dense_and_checkpoints(tmp_path):
    def build():
        torch.manual_seed(0)
        return BertForMaskedLM(BertConfig(**BERT_KW)).eval()

    model = qk.convert(build(), qk.QSparseConfig(sparsity=0.5))
    decoder = model.cls.predictions.decoder
    assert type(decoder) is DenseHead and decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert isinstance(model.cls.predictions.transform.dense, QSparseLinear)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from a fresh build
    qk.save_checkpoint(model, tmp_path / "bert.safetensors")
    fresh = qk.convert(build(), qk.QSparseConfig(sparsity=0.5))
    qk.load_checkpoint(fresh, tmp_path / "bert.safetensors")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "config", [qk.QSparseConfig(sparsity=MISTRAL_RECIPE), qk.QSparseConfig(weights="ternary", pack=True)]
)
def test_decoder_checkpoint_round_trip(config, tmp_path):
    src = qk.convert(_decoder("qwen2"), config)
    qk.save_checkpoint(src, tmp_path / "m.safetensors")
    dst = qk.convert(_decoder("qwen2"), config)
    qk.load_checkpoint(dst, tmp_path / "m.safetensors")
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(dst(ids).logits, src(ids).logits)


def test_llama_trains_under_autocast():
    model = qk.convert(_decoder("llama"), qk.QSparseConfig(sparsity=MISTRAL_RECIPE))
    ids = torch.randint(0, VOCAB, (2, 10))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    assert torch.isfinite(loss) and q.weight.grad is not None and q.weight.grad.dtype == torch.float32


def test_example_runs(monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "convert_llama.py"
    monkeypatch.setattr(sys, "argv", [str(script)])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "converted 14 linear layers; lm_head stays dense (DenseHead)" in out and "sparsity=0.6" in out
    assert "weight bytes read per token" in out and "from_pretrained gives bit-identical logits: True" in out


def test_save_pretrained_round_trip_and_plain_checkpoint(tmp_path):
    """``save_pretrained`` of a converted model writes its ``quantization_config``, so
    ``from_pretrained`` gives the converted model back (tests/test_hf_roundtrip.py has the rest);
    after ``unconvert`` it saves a plain checkpoint, which converts again to the same model."""
    config = qk.QSparseConfig(sparsity=MISTRAL_RECIPE)
    model = qk.convert(_decoder("llama"), config)
    model.save_pretrained(tmp_path / "converted")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "converted").eval()
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QSparseLinear)
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    qk.unconvert(loaded).save_pretrained(tmp_path / "plain")
    again = qk.convert(LlamaForCausalLM.from_pretrained(tmp_path / "plain").eval(), config)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
