"""Hugging Face BitNet checkpoints (quant_method "bitnet", built and saved by transformers itself,
no download) through convert(): transformers' packed layers become this library's packed BitLinear
without float weights, with transformers' own outputs at sparsity 0 (float32) and Q-Sparse on top."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers.integrations.bitnet import unpack_weights

import qsparse_kernels as qk
from qsparse_kernels.bitnet_import import is_hf_bitnet
from qsparse_kernels.nn import BitLinear, DenseHead
from tests.bitnet_bounds import packed_error_bound
from tests.numerics import F32_REL, rel_err

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bitnet_checkpoint.py"
_spec = importlib.util.spec_from_file_location("bitnet_checkpoint_example", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

IDS = torch.tensor([[5, 17, 42, 8, 91, 60, 33, 7, 70, 12]])
EPILOGUE_REL = 1e-6  # SPEC: integer accumulators equal, the float epilogue within 1e-6 relative


@pytest.fixture(autouse=True)
def eager_one_thread():
    """transformers wraps its BitNet functions in torch.compile (~40 s to compile on a CPU); eager
    gives the same results (checked once by hand: bit-identical logits) in a fraction of the time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._dynamo.config.patch(disable=True):
        yield
    torch.set_num_threads(n)


def _hf_io(model):
    """One forward on IDS: logits and ``{name: (layer, input, output)}`` of every transformers BitNet layer."""
    layers = {n: m for n, m in model.named_modules() if is_hf_bitnet(m)}
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, y, n=n: seen.__setitem__(n, (a[0].detach(), y.detach())))
        for n, m in layers.items()
    ]
    with torch.no_grad():
        logits = model(IDS).logits
    for h in hooks:
        h.remove()
    return logits, {n: (layers[n], *seen[n]) for n in layers}


def test_packed_bitlinear_checkpoint_gives_transformers_outputs(tmp_path):
    example.make_bitnet_checkpoint(tmp_path, attention_bias=True)
    model = example.load(tmp_path)
    hf_logits, hf = _hf_io(model)
    assert len(hf) == 14 and all(type(m).__name__ == "BitLinear" for m, _, _ in hf.values())
    assert all(m.weight.dtype == torch.uint8 for m, _, _ in hf.values())  # packed [out / 4, in]
    hf_t = {n: unpack_weights(m.weight, torch.int8) for n, (m, _, _) in hf.items()}  # transformers' own unpacking
    hf_scale = {n: m.weight_scale.clone() for n, (m, _, _) in hf.items()}
    hf_bias = {n: None if m.bias is None else m.bias.clone() for n, (m, _, _) in hf.items()}

    out, report = qk.convert(model, qk.QSparseConfig(sparsity=0.0), return_report=True)
    assert out is model and report.layers == {"BitLinear (packed)": 14, "nn.Linear (not converted)": 1}
    assert not any(is_hf_bitnet(m) for m in model.modules()) and type(model.lm_head) is DenseHead
    for name, (_, x, y_hf) in hf.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, BitLinear) and layer.is_packed, name
        assert torch.equal(qk.unpack_ternary(layer.packed, layer.out_features), hf_t[name]), name  # same codes
        assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, 1 / hf_scale[name].reshape(()))
        with torch.no_grad():
            y = layer(x)
        b = hf_bias[name]
        mag = (y_hf - b).abs() + b.abs() if b is not None else y_hf.abs()
        assert bool(((y - y_hf).abs() <= EPILOGUE_REL * mag).all()), name  # only the epilogue rounds differently
    with torch.no_grad():
        logits = model(IDS).logits
    assert rel_err(logits, hf_logits) <= EPILOGUE_REL


def test_qsparse_on_top_of_a_bitnet_checkpoint(tmp_path):
    example.make_bitnet_checkpoint(tmp_path)
    model = example.load(tmp_path)
    _, hf = _hf_io(model)
    hf_t = {n: unpack_weights(m.weight, torch.int8) for n, (m, _, _) in hf.items()}
    hf_scale = {n: (1 / m.weight_scale.float()).reshape(()) for n, (m, _, _) in hf.items()}
    qk.convert(model, qk.QSparseConfig(sparsity=0.6, layers={"*.down_proj": 0.75}))
    for name, (_, x, _) in hf.items():
        layer = model.get_submodule(name)
        s = 0.75 if name.endswith("down_proj") else 0.6
        assert layer.sparsity == s, name
        k = qk.sparsity_to_k(layer.in_features, s)
        ref = qk.ternary_linear(
            x, qk.pack_ternary(hf_t[name]), hf_scale[name], layer.out_features, k=k, backend="reference"
        )
        with torch.no_grad():
            assert torch.equal(layer(x), ref), name
    out = model.generate(IDS, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 5)


def test_converted_bitnet_model_saves_and_loads_as_qsparse(tmp_path):
    example.make_bitnet_checkpoint(tmp_path / "bitnet")
    model = qk.convert(example.load(tmp_path / "bitnet"), qk.QSparseConfig(sparsity=0.5))
    assert model.config.quantization_config.quant_method == "qsparse_kernels"
    model.save_pretrained(tmp_path / "converted")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert again.quantization_method == "qsparse_kernels"
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_autobitlinear_offline_and_online(tmp_path):
    example.make_bitnet_checkpoint(
        tmp_path / "off", quantization={"linear_class": "autobitlinear"}, attention_bias=True
    )
    model = example.load(tmp_path / "off")
    hf_logits, hf = _hf_io(model)
    assert all(type(m).__name__ == "AutoBitLinear" and not m.online_quant for m, _, _ in hf.values())
    qk.convert(model, qk.QSparseConfig(sparsity=0.0))
    for name, (_, x, y_hf) in hf.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, BitLinear) and layer.is_packed, name
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            err = (layer(x2).double() - y_hf.reshape(x2.shape[0], -1).double()).abs()
        assert bool((err <= packed_error_bound(layer, x2)).all()), name  # their float sum vs our int32 one
    with torch.no_grad():
        assert rel_err(model(IDS).logits, hf_logits) <= F32_REL

    online = {"linear_class": "autobitlinear", "quantization_mode": "online"}
    example.make_bitnet_checkpoint(tmp_path / "on", quantization=online)
    model = example.load(tmp_path / "on")
    hf_logits, hf = _hf_io(model)
    masters = {n: m.weight for n, (m, _, _) in hf.items()}
    qk.convert(model, qk.QSparseConfig(sparsity=0.0))
    for name in hf:
        layer = model.get_submodule(name)
        assert isinstance(layer, BitLinear) and not layer.is_packed and layer.weight is masters[name]
    with torch.no_grad():  # the same fake quantization; the STE sum x + (q - x) rounds in float32
        assert rel_err(model(IDS).logits, hf_logits) <= F32_REL
    packed = qk.convert(example.load(tmp_path / "on"), qk.QSparseConfig(sparsity=0.5, weights="ternary", pack=True))
    assert all(m.is_packed for m in packed.modules() if isinstance(m, BitLinear))


def test_bad_bitnet_layers_are_named(tmp_path):
    example.make_bitnet_checkpoint(tmp_path / "a")
    model = example.load(tmp_path / "a")
    layer = model.model.layers[1].mlp.up_proj
    layer.weight[3, 5] = 0xFF  # code 3 in all four rows the byte holds
    with pytest.raises(ValueError, match=r"BitNet layer 'model.layers.1.mlp.up_proj': weight holds the invalid "):
        qk.convert(model, qk.QSparseConfig(sparsity=0.5))
    assert is_hf_bitnet(model.model.layers[0].mlp.up_proj)  # nothing half-converted
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is a BitNet \(ternary\) layer; block"):
        qk.convert(example.load(tmp_path / "a"), qk.QSparseConfig(block=(16, 32)))
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj': .*k must be in \[0, 128\]"):
        qk.convert(example.load(tmp_path / "a"), qk.QSparseConfig(k=500))

    example.make_bitnet_checkpoint(tmp_path / "norm", quantization={"use_rms_norm": True})
    with pytest.raises(ValueError, match=r"use_rms_norm=True \(an RMSNorm inside the linear layer\) is not supported"):
        qk.convert(example.load(tmp_path / "norm"), qk.QSparseConfig(sparsity=0.0))


def test_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--sparsity", "0.6"])
    example.main()
    out = capsys.readouterr().out
    assert "converted {'BitLinear (packed)': 14, 'nn.Linear (not converted)': 1}" in out
    diff = float(out.split("relative difference ")[1].split()[0])
    assert diff <= EPILOGUE_REL
    assert "kept input features per token (converted layers): 39.9%" in out
    assert "logits bit-identical: True" in out
