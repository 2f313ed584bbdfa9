"""save_pretrained / from_pretrained of converted models (quantization method "qsparse_kernels"):
a fresh process gets bit-identical logits, shards and device_map work, peak memory is about the
packed size, and a checkpoint that does not match its config.json is an error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import qsparse_kernels as qk
from qsparse_kernels.nn import BitLinear, QSparseLinear
from tests.test_convert import MISTRAL_RECIPE

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
MIXED = qk.QSparseConfig(
    sparsity=0.5,
    layers={
        "*.down_proj": {"weights": "ternary", "pack": True, "sparsity": 0.6},
        "*.up_proj": {"weights": "ternary"},  # training-mode BitLinear: float master weight
        "*.gate_proj": {"block": (16, 32)},
        "*.k_proj": {"k": 7},
        "*.o_proj": None,
    },
)
IDS = [[3, 17, 42, 8, 91, 5, 60, 33, 2, 70]]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _saved(tmp_path, config, **save_kw):
    torch.manual_seed(0)
    model = qk.convert(LlamaForCausalLM(LlamaConfig(**SMALL)).eval(), config)
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
    model.save_pretrained(tmp_path, **save_kw)
    torch.save(logits, tmp_path / "reference_logits.pt")
    return model


FRESH_LOAD = r"""
import sys, torch
import qsparse_kernels as qk
from transformers import AutoModelForCausalLM
from qsparse_kernels.nn import BitLinear, QSparseLinear
torch.set_num_threads(1)
kwargs = {"device_map": "cpu"} if sys.argv[2] == "cpu" else {}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
assert "qsparse_kernels" in str(model.config.quantization_config)
for name, m in model.named_modules():
    if isinstance(m, QSparseLinear):
        assert m.weight.stride(0) == 1 and m.weight.device.type == "cpu", name
with torch.no_grad():
    logits = model(torch.tensor(TOKEN_IDS)).logits
ref = torch.load(sys.argv[1] + "/reference_logits.pt")
print("bit-identical" if torch.equal(logits, ref) else f"DIFFERENT max {(logits - ref).abs().max()}")
""".replace("TOKEN_IDS", repr(IDS))


def _fresh(path, device_map="none") -> str:
    res = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(path), device_map],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()[-1]


def test_save_pretrained_writes_every_layers_settings(tmp_path):
    model = _saved(tmp_path, MIXED)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qsparse_kernels" and qc["version"] == 1
    layers = qc["layers"]
    converted = {n for n, m in model.named_modules() if isinstance(m, (QSparseLinear, BitLinear))}
    assert set(layers) == converted and len(layers) == 12  # 7 projections - o_proj, 2 blocks
    assert layers["model.layers.0.mlp.down_proj"] == {
        "type": "BitLinear",
        "in_features": 128,
        "out_features": 64,
        "bias": False,
        "sparsity": 0.6,
        "k": None,
        "block": None,
        "backend": "auto",
        "packed": True,
    }
    assert layers["model.layers.1.mlp.up_proj"]["packed"] is False
    assert layers["model.layers.0.mlp.gate_proj"]["block"] == [16, 32]
    assert layers["model.layers.0.self_attn.k_proj"]["k"] == 7
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.packed" in keys and "model.layers.0.mlp.down_proj.weight" not in keys


def test_layers_packed_after_convert_are_saved_as_packed(tmp_path):
    torch.manual_seed(0)
    model = qk.convert(LlamaForCausalLM(LlamaConfig(**SMALL)).eval(), qk.QSparseConfig(weights="ternary"))
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.pack()
    model.save_pretrained(tmp_path)
    layers = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["layers"]
    assert len(layers) == 14 and all(e["packed"] for e in layers.values())


@pytest.mark.parametrize(
    "config, shard, device_map",
    [
        (MIXED, None, "none"),
        (MIXED, "60KB", "cpu"),  # several safetensors shards
        (qk.QSparseConfig(sparsity=MISTRAL_RECIPE), "100KB", "cpu"),
        (qk.QSparseConfig(sparsity=0.5, weights="ternary", pack=True), None, "cpu"),
    ],
)
def test_fresh_process_from_pretrained_is_bit_identical(tmp_path, config, shard, device_map):
    _saved(tmp_path, config, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert _fresh(tmp_path, device_map) == "bit-identical"


def test_loaded_model_saves_again_and_generates(tmp_path):
    _saved(tmp_path / "a", MIXED)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.model.layers[1].mlp.down_proj.is_packed
    model.save_pretrained(tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, torch.load(tmp_path / "a" / "reference_logits.pt"))
    out = again.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(IDS[0]) + 4)
    with pytest.raises(ValueError, match="already converted"):
        qk.convert(again, qk.QSparseConfig())


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"]["layers"])
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


DOWN = "model.layers.0.mlp.down_proj"
Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, err",
    [
        (
            lambda p: _edit_config(p, lambda layers: layers.pop(DOWN)),
            rf"packed tensor '{DOWN}.packed', but quantization_config does not list '{DOWN}'",
        ),
        (
            lambda p: _edit_config(p, lambda layers: layers[DOWN].update(packed=False)),
            rf"the checkpoint has no '{DOWN}.weight', which layer '{DOWN}' \(BitLinear\) needs",
        ),
        (
            lambda p: _edit_config(p, lambda layers: layers[Q].update(bias=True)),
            rf"the checkpoint has no '{Q}.bias', which layer '{Q}' \(QSparseLinear\) needs",
        ),
        (
            lambda p: _edit_config(p, lambda layers: layers[Q].update(out_features=32)),
            rf"layer '{Q}' is 64 -> 32 in quantization_config, but the model has Linear\(in_features=64",
        ),
        (
            lambda p: _edit_tensors(p, lambda s: s.__setitem__(f"{Q}.weight", s[f"{Q}.weight"][:, :32].contiguous())),
            rf"'{Q}.weight' is F32 of shape \[64, 32\], but layer '{Q}' \(64 -> 64\) needs a float tensor of shape "
            r"\[64, 64\]",
        ),
        (
            lambda p: _edit_tensors(p, lambda s: s.__setitem__(f"{DOWN}.scale", s[f"{DOWN}.scale"].double())),
            rf"'{DOWN}.scale' is F64 of shape \[\], but layer '{DOWN}' \(128 -> 64\) needs F32",
        ),
        (
            lambda p: _edit_tensors(p, lambda s: s[f"{DOWN}.packed"].__setitem__((5, 3), 0xFF)),
            rf"'{DOWN}.packed' holds the invalid ternary code 3",
        ),
        (
            lambda p: _edit_tensors(p, lambda s: s[f"{DOWN}.scale"].fill_(-1.0)),
            rf"'{DOWN}.scale' must be finite and > 0, got -1.0",
        ),
        (
            lambda p: _edit_config(p, lambda layers: layers[Q].update(type="Int4Linear")),
            r"has type 'Int4Linear'; known types",
        ),
        (
            lambda p: _edit_config(p, lambda layers: layers.__setitem__("model.layers.0.nope", dict(layers[Q]))),
            r"lists layer 'model.layers.0.nope', but the model has no module of that name",
        ),
    ],
)
def test_checkpoint_that_does_not_match_its_config_is_an_error(tmp_path, edit, err):
    _saved(tmp_path, MIXED)
    edit(tmp_path)
    with pytest.raises(ValueError, match=err):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unconvert_takes_the_quantization_config_away(tmp_path):
    torch.manual_seed(0)
    model = qk.convert(LlamaForCausalLM(LlamaConfig(**SMALL)).eval(), qk.QSparseConfig(sparsity=0.5))
    assert model.config.quantization_config.layers
    qk.unconvert(model)
    assert not hasattr(model, "hf_quantizer") and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert all(
        type(m) is nn.Linear for m in LlamaForCausalLM.from_pretrained(tmp_path).modules() if isinstance(m, nn.Linear)
    )


PEAK = r"""
import gc, json, sys
import torch
import qsparse_kernels as qk  # noqa: F401
from transformers import AutoModelForCausalLM

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
torch.set_num_threads(1)
ids = torch.arange(8).reshape(1, 8)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")  # warm-up: lazy imports, first-call buffers
with torch.no_grad():
    m(ids)
del m
gc.collect()
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the current RSS
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
with torch.no_grad():
    m(ids)  # touches every weight page
print(json.dumps({"peak": status("VmHWM:") - before}))
"""


def test_peak_memory_of_from_pretrained_is_about_the_packed_size(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    qk.convert(model, qk.QSparseConfig(sparsity=0.5, weights="ternary", pack=True))
    model.save_pretrained(tmp_path)
    packed_bytes = (tmp_path / "model.safetensors").stat().st_size
    del model
    res = subprocess.run(
        [sys.executable, "-c", PEAK, str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    peak = json.loads(res.stdout.strip().splitlines()[-1])["peak"]
    print(
        f"float model {float_bytes / 1e6:.1f} MB, packed checkpoint {packed_bytes / 1e6:.1f} MB, "
        f"peak RSS of from_pretrained + one forward {peak / 1e6:.1f} MB"
    )
    assert float_bytes > 13 * packed_bytes  # the model is mostly packed projections
    assert peak < 2.5 * packed_bytes  # the packed tensors (and their file pages), never the float model


@pytest.mark.parametrize("transformers_first", [False, True])
def test_import_registers_lazily_without_importing_transformers(transformers_first):
    code = (
        "import sys\n"
        + ("import transformers.quantizers.auto\n" if transformers_first else "")
        + "import qsparse_kernels\n"
        + ("" if transformers_first else "assert 'transformers' not in sys.modules, 'imported transformers'\n")
        + "from transformers import AutoModelForCausalLM\n"
        + "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING\n"
        + "assert AUTO_QUANTIZER_MAPPING['qsparse_kernels'].__name__ == 'QSparseHfQuantizer'\n"
        + "assert AUTO_QUANTIZATION_CONFIG_MAPPING['qsparse_kernels'].__name__ == 'QSparseQuantConfig'\n"
        + "print('registered')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and res.stdout.strip() == "registered", res.stderr[-3000:]
