"""convert() as a user meets it: the report, a second convert, per-layer settings of any field,
and unconvert() back to plain nn.Linear."""

import pytest
import torch
from torch import nn

import qsparse_kernels as qk
from qsparse_kernels.nn import BitLinear, DenseHead, QSparseLinear
from tests.test_convert import TinyLM

D, FF, VOCAB = 32, 64, 50


def _layer(model, name):
    return model.get_submodule(name)


def test_report_counts_kept_fraction_and_bytes(capsys):
    model = TinyLM()
    out, report = qk.convert(model, qk.QSparseConfig(sparsity=0.5), verbose=True, return_report=True)
    assert out is model
    assert report.layers == {"QSparseLinear": 14, "nn.Linear (not converted)": 1}
    assert report.converted == 14 and report.kept_fraction == 0.5
    per_block = 4 * D * D + 2 * D * FF + FF * D  # weights of one decoder layer's projections
    head = D * VOCAB
    assert report.bytes_before == 4 * (2 * per_block + head)  # float32
    assert report.bytes_after == 4 * (2 * per_block // 2 + head)  # half of every input row kept
    assert report.names["nn.Linear (not converted)"] == ["lm_head"]
    printed = capsys.readouterr().out
    assert printed.strip() == str(report).strip()
    assert "14 layer(s) converted" in printed and "kept input features per token (converted layers): 50.0%" in printed
    assert "weight bytes read per token: 0.09 MB -> 0.05 MB (0.536x)" in printed


def test_report_of_packed_ternary_counts_two_bits_per_kept_weight():
    _, report = qk.convert(TinyLM(), qk.QSparseConfig(sparsity=0.5, weights="ternary", pack=True), return_report=True)
    assert report.layers == {"BitLinear (packed)": 14, "nn.Linear (not converted)": 1}
    packed = 2 * (4 * 16 * (D // 4) + 2 * 16 * (FF // 4) + 32 * (D // 4))  # kept rows x ceil(out / 4) bytes
    assert report.bytes_after == packed + 4 * D * VOCAB


def test_convert_returns_the_model_without_report_and_prints_nothing(capsys):
    model = TinyLM()
    assert qk.convert(model, qk.QSparseConfig(sparsity=0.5)) is model
    assert capsys.readouterr().out == ""


def test_second_convert_is_an_error_naming_the_way_out():
    model = qk.convert(TinyLM(), qk.QSparseConfig(sparsity=0.5))
    with pytest.raises(
        ValueError, match=r"already converted \(14 Q-Sparse layer\(s\), e.g. 'layers.0.self_attn.q_proj'\)"
    ):
        qk.convert(model, qk.QSparseConfig(sparsity=0.3))
    assert model.layers[0].self_attn.q_proj.sparsity == 0.5  # untouched
    # on purpose: a filter converts more of the plain nn.Linear layers
    qk.convert(model, qk.QSparseConfig(sparsity=0.2), filter_fn=lambda m, name: name == "lm_head")
    assert isinstance(model.lm_head, QSparseLinear) and model.lm_head.sparsity == 0.2
    assert model.layers[0].self_attn.q_proj.sparsity == 0.5


def test_layers_patterns_set_any_field():
    model = TinyLM()
    ids = torch.randint(0, VOCAB, (2, 7))
    config = qk.QSparseConfig(
        sparsity=0.4,
        backend="auto",
        layers={
            "layers.0.mlp.down_proj": {"weights": "ternary", "pack": True, "sparsity": 0.6},
            "*.down_proj": {"weights": "ternary"},
            "*.gate_proj": {"block": (16, 32)},
            "*.up_proj": {"k": 5, "backend": "reference"},
            "*.o_proj": None,
            "*.v_proj": 0.25,
        },
    )
    qk.convert(model, config)
    d0, d1 = model.layers[0].mlp.down_proj, model.layers[1].mlp.down_proj
    assert isinstance(d0, BitLinear) and d0.is_packed and d0.sparsity == 0.6
    assert isinstance(d1, BitLinear) and not d1.is_packed and d1.sparsity == 0.4
    gate = model.layers[0].mlp.gate_proj
    assert isinstance(gate, QSparseLinear) and gate.block == (16, 32)
    up = model.layers[1].mlp.up_proj
    assert up.k == 5 and up.backend == "reference" and up.kept() == 5
    assert type(model.layers[0].self_attn.o_proj) is nn.Linear
    assert model.layers[0].self_attn.v_proj.sparsity == 0.25
    q = model.layers[0].self_attn.q_proj  # no pattern: the top-level fields
    assert isinstance(q, QSparseLinear) and q.sparsity == 0.4 and q.backend == "auto"
    assert type(model.lm_head) is DenseHead
    assert model(ids).shape == (2, 7, VOCAB)


def test_layers_config_is_read_only_and_hashable():
    config = qk.QSparseConfig(layers={"*.q_proj": {"sparsity": 0.3}, "*": None})
    assert hash(config) == hash(qk.QSparseConfig(layers={"*.q_proj": {"sparsity": 0.3}, "*": None}))
    with pytest.raises(TypeError):
        config.layers["*.k_proj"] = 0.5
    assert dict(config.layers["*.q_proj"]) == {"sparsity": 0.3, "k": None}


@pytest.mark.parametrize(
    "kwargs, exc, err",
    [
        (
            {"layers": {"*.q_proj": {"sparsty": 0.5}}},
            ValueError,
            r"layers\['\*.q_proj'\] has unknown field\(s\) \['sparsty'\]",
        ),
        (
            {"layers": {"*.q_proj": {"sparsity": 1.5}}},
            ValueError,
            r"layers\['\*.q_proj'\]: .*sparsity must be in \[0, 1\)",
        ),
        (
            {"layers": {"*.q_proj": {"block": (8, 16), "weights": "ternary"}}},
            ValueError,
            r"layers\['\*.q_proj'\]: .*needs weights='dense'",
        ),
        ({"layers": {"*": {"pack": True}}}, ValueError, r"layers\['\*'\]: .*pack=True needs weights='ternary'"),
        ({"layers": {3: 0.5}}, TypeError, "layers patterns must be str"),
        ({"layers": {}}, ValueError, "layers must be a non-empty mapping"),
        ({"layers": {"*": 0.5}, "sparsity": {"*": 0.5}}, ValueError, "either a sparsity mapping or layers"),
        ({"k": -1}, ValueError, "k must be in >= 0, got -1"),
    ],
)
def test_bad_layers_name_the_pattern(kwargs, exc, err):
    with pytest.raises(exc, match=err):
        qk.QSparseConfig(**kwargs)


def test_layers_pattern_that_wins_nothing_raises_and_converts_nothing():
    model = TinyLM()
    with pytest.raises(ValueError, match=r"pattern\(s\) \['\*.q_prj'\] matched no selected nn.Linear"):
        qk.convert(model, qk.QSparseConfig(layers={"*.q_prj": 0.5}))
    assert not any(isinstance(m, (QSparseLinear, BitLinear)) for m in model.modules())


def test_a_layers_k_too_large_for_the_layer_names_it():
    with pytest.raises(ValueError, match=r"layer 'layers.0.self_attn.q_proj'.*k must be in \[0, 32\]"):
        qk.convert(TinyLM(), qk.QSparseConfig(layers={"*.q_proj": {"k": 40}}))


def test_unconvert_gives_back_the_dense_model():
    base = TinyLM()
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        ref = base(ids)
    params = dict(base.named_parameters())
    model = qk.convert(base, qk.QSparseConfig(sparsity=0.5, layers={"*.down_proj": {"weights": "ternary"}}))
    assert qk.unconvert(model) is model
    assert not any(isinstance(m, (QSparseLinear, BitLinear)) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)  # same objects
    assert all(p.is_contiguous() for p in after.values())  # row-major again
    with torch.no_grad():
        assert torch.equal(model(ids), ref)
    qk.convert(model, qk.QSparseConfig(sparsity=0.3))  # converting again after unconvert is fine
    assert model.layers[0].mlp.up_proj.sparsity == 0.3


def test_unconvert_refuses_packed_layers_unless_filtered():
    model = qk.convert(
        TinyLM(), qk.QSparseConfig(sparsity=0.5, layers={"*.down_proj": {"weights": "ternary", "pack": True}})
    )
    with pytest.raises(
        ValueError, match=r"packed BitLinear layer\(s\) \['layers.0.mlp.down_proj', 'layers.1.mlp.down_proj'\]"
    ):
        qk.unconvert(model)
    assert isinstance(model.layers[0].mlp.up_proj, QSparseLinear)  # nothing half-done
    qk.unconvert(model, filter_fn=lambda m, name: not (isinstance(m, BitLinear) and m.is_packed))
    assert type(model.layers[0].mlp.up_proj) is nn.Linear and model.layers[0].mlp.down_proj.is_packed


def test_unconvert_root_layer_and_bad_argument():
    lin = nn.Linear(8, 4)
    q = qk.convert(lin, qk.QSparseConfig(sparsity=0.5))
    back = qk.unconvert(q)
    assert type(back) is nn.Linear and back.weight is lin.weight and back.bias is lin.bias
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        qk.unconvert("model")
