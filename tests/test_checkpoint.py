"""Checkpoints of converted models: safetensors (save_checkpoint / load_checkpoint) and torch.save."""

import os
import pickle

import pytest
import torch
from torch import nn

import qsparse_kernels as qk
from qsparse_kernels.nn import BitLinear, QSparseLinear
from tests.test_convert import MISTRAL_RECIPE, TinyLM

CONFIGS = {
    "dense": qk.QSparseConfig(sparsity=MISTRAL_RECIPE),
    "block": qk.QSparseConfig(block=(8, 16)),
    "ternary": qk.QSparseConfig(sparsity=0.5, weights="ternary"),
    "packed": qk.QSparseConfig(sparsity=0.5, weights="ternary", pack=True),
}


def _pair(config):
    src = qk.convert(TinyLM(), config)
    dst = qk.convert(TinyLM(), config if not config.pack else qk.QSparseConfig(sparsity=0.5, weights="ternary"))
    return src, dst


@pytest.mark.parametrize("name", list(CONFIGS))
def test_safetensors_round_trip_is_bit_exact(name, tmp_path, monkeypatch):
    src, dst = _pair(CONFIGS[name])
    path = tmp_path / "model.safetensors"
    qk.save_checkpoint(src, path)

    def no_pickle(*a, **k):
        raise AssertionError("load_checkpoint must not unpickle")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    missing, unexpected = qk.load_checkpoint(dst, path)
    assert not missing and not unexpected
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(dst(ids), src(ids))
    for m in dst.modules():
        if isinstance(m, QSparseLinear):
            assert m.weight.stride(0) == 1
        if isinstance(m, BitLinear):
            assert m.is_packed == (name == "packed")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_save_round_trip_is_bit_exact(name, tmp_path):
    src, dst = _pair(CONFIGS[name])
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    dst.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(dst(ids), src(ids))


def test_tied_weights_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.body = nn.Linear(16, 16)
            self.out = nn.Linear(16, 30, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.body(self.emb(ids)))

    src, dst = qk.convert(Tied(), qk.QSparseConfig()), qk.convert(Tied(), qk.QSparseConfig())
    qk.save_checkpoint(src, tmp_path / "t.safetensors")
    qk.load_checkpoint(dst, tmp_path / "t.safetensors")
    assert dst.out.weight is dst.emb.weight
    ids = torch.randint(0, 30, (3, 4))
    assert torch.equal(dst(ids), src(ids))


def test_packed_checkpoint_is_8x_smaller_than_bf16(tmp_path):
    dense = nn.Sequential(nn.Linear(512, 1024, bias=False, dtype=torch.bfloat16))
    qk.save_checkpoint(dense, tmp_path / "bf16.safetensors")
    packed = qk.convert(nn.Sequential(nn.Linear(512, 1024, bias=False)), CONFIGS["packed"])
    assert packed[0].packed.numel() == 512 * 256 and packed[0].packed.dtype == torch.uint8
    qk.save_checkpoint(packed, tmp_path / "packed.safetensors")
    ratio = os.path.getsize(tmp_path / "bf16.safetensors") / os.path.getsize(tmp_path / "packed.safetensors")
    assert 7.8 < ratio <= 8.0, ratio


def test_shape_mismatch_names_the_key(tmp_path):
    qk.save_checkpoint(qk.convert(TinyLM(ff=64), CONFIGS["dense"]), tmp_path / "a.safetensors")
    with pytest.raises(RuntimeError, match=r"size mismatch for layers.0.mlp.gate_proj.weight"):
        qk.load_checkpoint(qk.convert(TinyLM(ff=96), CONFIGS["dense"]), tmp_path / "a.safetensors")


def test_packed_shape_mismatch_names_the_key(tmp_path):
    qk.save_checkpoint(qk.convert(TinyLM(ff=64), CONFIGS["packed"]), tmp_path / "p.safetensors")
    with pytest.raises(RuntimeError, match=r"'layers.0.mlp.gate_proj.packed' has shape \[32, 16\]"):
        qk.load_checkpoint(qk.convert(TinyLM(ff=96), CONFIGS["ternary"]), tmp_path / "p.safetensors")


@pytest.mark.parametrize(
    "saved, loaded, err",
    [
        ("dense", "block", r"'layers.0.mlp.down_proj' was saved with sparsity=0.6, but the model has sparsity=0.5"),
        ("block", "dense", r"'layers.0.mlp.down_proj' was saved with sparsity=0.5, but the model has sparsity=0.6"),
        ("dense", "ternary", r"safetensors' has a QSparseLinear at 'layers.0.mlp.down_proj', but the model has a BitL"),
        ("packed", "dense", r"has a BitLinear at 'layers.0.mlp.down_proj', but the model has a QSparseLinear"),
    ],
)
def test_config_mismatch_names_the_layer(saved, loaded, err, tmp_path):
    qk.save_checkpoint(qk.convert(TinyLM(), CONFIGS[saved]), tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=err):
        qk.load_checkpoint(qk.convert(TinyLM(), CONFIGS[loaded]), tmp_path / "c.safetensors")


def test_unconverted_model_is_told_to_convert_first(tmp_path):
    qk.save_checkpoint(qk.convert(TinyLM(), CONFIGS["dense"]), tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="but the model has a plain layer there: convert the model"):
        qk.load_checkpoint(TinyLM(), tmp_path / "c.safetensors")


def test_bad_packed_codes_in_a_file_are_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "p.safetensors"
    qk.save_checkpoint(qk.convert(TinyLM(), CONFIGS["packed"]), path)
    tensors = load_file(path)
    tensors["layers.1.self_attn.o_proj.packed"][0, 0] = 0xFF
    save_file(tensors, path)  # no metadata: the config check is skipped only when asked to
    with pytest.raises(RuntimeError, match=r"'layers.1.self_attn.o_proj.packed' holds the invalid ternary code 3"):
        qk.load_checkpoint(qk.convert(TinyLM(), CONFIGS["ternary"]), path, check_config=False)
