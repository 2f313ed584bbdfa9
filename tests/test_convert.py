"""convert() / QSparseConfig on a small Llama-shaped model (no transformers needed here)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qsparse_kernels as qk
from qsparse_kernels.backends import reference_backend
from qsparse_kernels.convert import default_filter
from qsparse_kernels.nn import BitLinear, DenseHead, QSparseLinear
from tests.bitnet_bounds import packed_error_bound

MISTRAL_RECIPE = {  # the paper's per-projection sparsity for continue-training Mistral
    "*.[qkv]_proj": 0.42,
    "*.o_proj": 0.40,
    "*.up_proj": 0.40,
    "*.gate_proj": 0.40,
    "*.down_proj": 0.60,
}
PROJ_SPARSITY = {"q_proj": 0.42, "k_proj": 0.42, "v_proj": 0.42, "o_proj": 0.4, "up_proj": 0.4, "gate_proj": 0.4,
                 "down_proj": 0.6}


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class MLP(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.self_attn, self.mlp = Attn(d), MLP(d, ff)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.self_attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=32, ff=64, n_layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d, ff) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _proj_names(model):
    return [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJ_SPARSITY]


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_per_layer_sparsity_recipe(backend):
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 9))
    ref = model(ids)
    out = qk.convert(model, qk.QSparseConfig(sparsity=MISTRAL_RECIPE, backend=backend))
    assert out is model
    names = _proj_names(model)
    assert len(names) == 14
    for name in names:
        mod = model.get_submodule(name)
        assert isinstance(mod, QSparseLinear) and mod.backend == backend, name
        assert mod.sparsity == PROJ_SPARSITY[name.rsplit(".", 1)[-1]], name
        assert mod.weight.stride(0) == 1
    assert type(model.lm_head) is DenseHead  # the output head stays dense (the library's GEMV)
    y = model(ids)
    assert y.shape == ref.shape and not torch.allclose(y, ref)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_sparsity_zero_equals_original(backend):
    model = TinyLM()
    ids = torch.randint(0, 50, (3, 7))
    ref = model(ids)
    qk.convert(model, qk.QSparseConfig(sparsity=0.0, backend=backend))
    assert sum(isinstance(m, QSparseLinear) for m in model.modules()) == 14
    torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)


def test_parameters_are_shared_and_optimizer_keeps_working():
    model = TinyLM()
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    qk.convert(model, qk.QSparseConfig(sparsity=0.5))
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)  # same objects, names
    ids = torch.randint(0, 50, (4, 8))
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_first_match_wins_and_unmatched_layers_stay_dense():
    model = TinyLM()
    qk.convert(model, qk.QSparseConfig(sparsity={"layers.0.mlp.down_proj": 0.7, "*.down_proj": 0.3}))
    assert model.layers[0].mlp.down_proj.sparsity == 0.7 and model.layers[1].mlp.down_proj.sparsity == 0.3
    assert type(model.layers[0].mlp.up_proj) is nn.Linear and type(model.layers[0].self_attn.q_proj) is nn.Linear


@pytest.mark.parametrize(
    "sparsity, err",
    [
        ({"*.q_prj": 0.5}, r"\['\*.q_prj'\] matched no selected"),
        ({"*": 0.5, "*.down_proj": 0.6}, r"\['\*.down_proj'\] matched no selected nn.Linear \(or only layers an"),
        ({"*.lm_head": 0.5}, r"matched no selected"),  # the head is not selected by default
    ],
)
def test_pattern_matching_nothing_raises(sparsity, err):
    model = TinyLM()
    with pytest.raises(ValueError, match=err):
        qk.convert(model, qk.QSparseConfig(sparsity=sparsity))
    assert not any(isinstance(m, QSparseLinear) for m in model.modules())  # nothing half-converted


@pytest.mark.parametrize(
    "kwargs, exc, err",
    [
        ({"sparsity": 1.0}, ValueError, r"QSparseConfig.sparsity: sparsity must be in \[0, 1\), got 1.0"),
        ({"sparsity": -0.2}, ValueError, "sparsity must be in"),
        ({"sparsity": "half"}, TypeError, "sparsity must be a float"),
        ({"sparsity": {"*.q_proj": 1.5}}, ValueError, r"sparsity\['\*.q_proj'\]: sparsity must be in"),
        ({"sparsity": {}}, ValueError, "mapping is empty"),
        ({"sparsity": {3: 0.5}}, TypeError, "patterns must be str"),
        ({"weights": "int4"}, ValueError, r"weights must be one of \('dense', 'ternary'\), got 'int4'"),
        ({"block": (17, 16)}, ValueError, r"block n must be in \[0, 16\]"),
        ({"block": (2, 0)}, ValueError, "block m must be in"),
        ({"block": 16}, ValueError, r"block must be a pair \(n, m\)"),
        ({"block": (8, 16), "weights": "ternary"}, ValueError, "needs weights='dense'"),
        ({"block": (8, 16), "sparsity": {"*": 0.5}}, ValueError, "either a per-layer sparsity mapping or block"),
        ({"backend": "cuda2"}, ValueError, r"backend must be one of \('auto', 'reference'"),
        ({"pack": True}, ValueError, "pack=True needs weights='ternary'"),
    ],
)
def test_bad_config_values(kwargs, exc, err):
    with pytest.raises(exc, match=err):
        qk.QSparseConfig(**kwargs)


def test_bad_arguments_to_convert():
    with pytest.raises(TypeError, match="config must be a QSparseConfig"):
        qk.convert(TinyLM(), {"sparsity": 0.5})
    with pytest.raises(ValueError, match=r"layer 'layers.0.mlp.down_proj'.*block m = 48 must divide in_features = 64"):
        qk.convert(TinyLM(), qk.QSparseConfig(block=(16, 48)), filter_fn=lambda m, n: n.endswith("down_proj"))


def test_block_config():
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 5))
    qk.convert(model, qk.QSparseConfig(block=(16, 32)))
    q = model.layers[1].self_attn.q_proj
    assert q.block == (16, 32) and q.sparsity == 0.5 and "block=(16, 32)" in repr(q)
    assert model(ids).shape == (2, 5, 50)


def test_ternary_and_packed():
    """Every packed layer agrees with its training-mode self on the input it saw, within the
    float32 bound (a whole-model comparison would not be stable: a last-bit difference upstream
    may move a later activation across an int8 rounding boundary)."""
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 6))
    qk.convert(model, qk.QSparseConfig(sparsity=0.5, weights="ternary"))
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 14 and not any(m.is_packed for m in layers)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, y: seen.__setitem__(m, (a[0].detach(), y.detach()))) for m in layers]
    model(ids)
    for h in hooks:
        h.remove()
    for m in layers:
        x, y_train = seen[m]
        m.pack()
        x2 = x.reshape(-1, x.shape[-1])
        err = (m(x2).double() - y_train.reshape(x2.shape[0], -1).double()).abs()
        assert bool((err <= packed_error_bound(m, x2)).all())
    assert model(ids).shape == (2, 6, 50)
    m2 = qk.convert(TinyLM(), qk.QSparseConfig(sparsity=0.5, weights="ternary", pack=True))
    assert all(m.is_packed for m in m2.modules() if isinstance(m, BitLinear))


def test_default_filter_excludes_heads_tied_and_mha():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.body = nn.Linear(8, 8)
            self.classifier = nn.Linear(8, 3)
            self.decoder = nn.Linear(8, 20, bias=False)
            self.decoder.weight = self.emb.weight  # tied to the input embedding
            self.mha = nn.MultiheadAttention(8, 2)

    model = Heads()
    keep = default_filter(model)
    picked = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(m, n)]
    assert picked == ["body"]
    qk.convert(model, qk.QSparseConfig())
    assert isinstance(model.body, QSparseLinear) and type(model.classifier) is DenseHead
    assert model.emb.weight.stride(1) == 1  # the embedding was not re-laid out


def test_custom_filter_shared_module_and_root_linear():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 8))
    qk.convert(model, qk.QSparseConfig(sparsity=0.25), filter_fn=lambda m, name: name == "0")
    assert isinstance(model[0], QSparseLinear) and model[2] is model[0] and type(model[3]) is nn.Linear
    root = qk.convert(nn.Linear(8, 4), qk.QSparseConfig(sparsity=0.5))
    assert isinstance(root, QSparseLinear) and root.kept() == 4


def test_use_backend_switches_a_converted_model(monkeypatch):
    model = qk.convert(TinyLM(), qk.QSparseConfig(sparsity=0.5))
    ids = torch.randint(0, 50, (2, 6))
    calls = []
    impl = reference_backend.OPS["sparse_linear"]
    monkeypatch.setitem(reference_backend.OPS, "sparse_linear", lambda *a: calls.append(1) or impl(*a))
    with qk.use_backend("reference"):
        y_ref = model(ids)
    assert len(calls) == 14 and y_ref.shape == (2, 6, 50)
    pinned = qk.convert(TinyLM(), qk.QSparseConfig(sparsity=0.5, backend="reference"))
    calls.clear()
    pinned(ids)
    assert len(calls) == 14


def test_deepcopy_of_converted_model():
    model = qk.convert(TinyLM(), qk.QSparseConfig(sparsity=0.5))
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 50, (2, 6))
    assert torch.equal(twin(ids), model(ids)) and twin.layers[0].mlp.down_proj.weight.stride(0) == 1
