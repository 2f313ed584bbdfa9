"""Drop-in modules (qsparse_kernels.nn): outputs vs the functional ops, STE gradients, the BitNet
b1.58 formulas written out literally, packed vs training mode, layouts, state_dict, short training."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from qsparse_kernels.nn import BitLinear, QSparseLinear, ReLU2, ReLU2GLU
from tests.bitnet_bounds import packed_error_bound
from tests.numerics import assert_parity, distinct_magnitudes

BACKENDS = ["reference", "auto"]


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared machine OpenMP spinning
    makes them 10x slower; the kernels' threading has its own tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _x(rows, d, gen, dtype=torch.float32):
    """Distinct magnitudes per row (no top-K ties) in ``dtype``, scaled by a power of two to |x| <= 1."""
    x = distinct_magnitudes(rows, d, dtype, gen)
    return x * 2.0 ** -math.ceil(math.log2(float(x.abs().max())))


# ---------------- QSparseLinear ----------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_qsparse_linear_matches_functional(backend, dtype, bias, gen):
    m = QSparseLinear(48, 24, bias=bias, sparsity=0.6, backend=backend, dtype=dtype)
    x = _x(10, 48, gen, dtype).reshape(2, 5, 48)
    k = qk.sparsity_to_k(48, 0.6)
    assert m.kept() == k == 19
    y = m(x)
    assert y.shape == (2, 5, 24) and y.dtype == dtype
    assert torch.equal(y, qk.sparse_linear(x, m.weight, k, m.bias, backend=backend))
    b64 = None if m.bias is None else m.bias.double()
    ref64 = F.linear(R.topk_sparsify(x, k).double(), m.weight.double(), b64)
    plain = F.linear(R.topk_sparsify(x, k), m.weight, m.bias)
    assert_parity(y, ref64, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qsparse_linear_k_and_block(backend, gen):
    x = _x(6, 64, gen)
    mk = QSparseLinear(64, 16, k=5, sparsity=0.1, backend=backend)
    assert mk.kept() == 5 and "k=5" in repr(mk)
    assert torch.equal(mk(x), qk.sparse_linear(x, mk.weight, 5, mk.bias, backend=backend))
    assert_parity(mk(x), F.linear(R.topk_sparsify(x, 5).double(), mk.weight.double(), mk.bias.double()))
    mb = QSparseLinear(64, 16, block=(2, 8), backend=backend)
    assert mb.kept() == 16 and "block=(2, 8)" in repr(mb) and mb.sparsity == 0.75
    ref64 = F.linear(R.block_topk_sparsify(x, 2, 8).double(), mb.weight.double(), mb.bias.double())
    assert_parity(mb(x), ref64)
    assert "sparsity=0.5" in repr(QSparseLinear(8, 8)) and "backend='auto'" in repr(QSparseLinear(8, 8))


def test_qsparse_linear_sparsity_zero_is_dense(gen):
    lin = nn.Linear(32, 8)
    m = QSparseLinear(32, 8, sparsity=0.0)
    m.load_state_dict(lin.state_dict())
    x = _x(4, 32, gen)
    assert_parity(m(x), F.linear(x.double(), lin.weight.double(), lin.bias.double()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_qsparse_linear_ste_gradients(backend, gen):
    """dx = g @ W for every entry (masked ones too), dW = g^T @ topk(x), db = sum(g); plain
    autograd through the mask would give dx = 0 on the masked entries."""
    m = QSparseLinear(40, 12, sparsity=0.5, backend=backend)
    x = _x(7, 40, gen).requires_grad_(True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = m.weight.detach()
    xs = R.topk_sparsify(x.detach(), 20)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.weight.grad, g.t() @ xs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.bias.grad, g.sum(0), rtol=1e-5, atol=1e-6)
    # Plain autograd through the top-K mask, for contrast.
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(R.topk_sparsify(x2, 20), w).backward(g)
    masked = xs == 0
    assert int(masked.sum()) == 7 * 20
    assert bool((x2.grad[masked] == 0).all()) and bool((x.grad[masked] != 0).all())
    torch.testing.assert_close(x.grad[~masked], x2.grad[~masked], rtol=1e-5, atol=1e-6)


def test_weight_gradient_comes_in_the_weight_layout(gen):
    # Computed column-major like the weight: AccumulateGrad then neither copies nor adds across
    # transposed strides (torch.autograd.grad shows the raw gradient, before any layout fix-up).
    m = QSparseLinear(40, 12, sparsity=0.5)
    x = _x(7, 40, gen)
    g = torch.randn(7, 12, generator=gen)
    (dw,) = torch.autograd.grad(m(x), m.weight, g)
    assert dw.stride() == m.weight.stride() == (1, 12)
    torch.testing.assert_close(dw, g.t() @ R.topk_sparsify(x, 20), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_ste_gradients(backend, gen):
    m = QSparseLinear(32, 8, block=(3, 8), backend=backend)
    x = _x(5, 32, gen).requires_grad_(True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ m.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.weight.grad, g.t() @ R.block_topk_sparsify(x.detach(), 3, 8), rtol=1e-5, atol=1e-6)


def test_qsparse_linear_layout_and_parameter_identity():
    m = QSparseLinear(24, 10)
    assert m.weight.stride(0) == 1 and isinstance(m.weight, nn.Parameter)
    w = m.weight
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    lin = nn.Linear(24, 10)
    m.load_state_dict(lin.state_dict())  # row-major source
    assert m.weight is w and m.weight.stride(0) == 1 and torch.equal(m.weight, lin.weight)
    m(torch.randn(3, 24)).sum().backward()
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w, before)  # the optimizer still updates the same Parameter
    m.load_state_dict(lin.state_dict(), assign=True)
    assert m.weight.stride(0) == 1 and isinstance(m.weight, nn.Parameter) and torch.equal(m.weight, lin.weight)
    m.to(torch.bfloat16)
    assert m.weight.stride(0) == 1 and m.weight.dtype == torch.bfloat16
    # The reverse direction: a QSparseLinear state_dict loads into nn.Linear (same keys).
    assert list(m.state_dict()) == list(lin.state_dict()) == ["weight", "bias"]
    lin2 = nn.Linear(24, 10, dtype=torch.bfloat16)
    lin2.load_state_dict(m.state_dict())
    assert torch.equal(lin2.weight, m.weight)


def test_qsparse_linear_init_matches_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    torch.manual_seed(0)
    m = QSparseLinear(16, 8)
    assert torch.equal(m.weight, lin.weight) and torch.equal(m.bias, lin.bias)


def test_from_linear_shares_parameters():
    lin = nn.Linear(16, 8)
    ref = lin.weight.detach().clone()
    m = QSparseLinear.from_linear(lin, sparsity=0.25)
    assert m.weight is lin.weight and m.bias is lin.bias  # no second copy
    assert m.weight.stride(0) == 1 and torch.equal(m.weight, ref) and m.kept() == 12
    assert not any(p.is_meta for p in m.parameters())
    b = BitLinear.from_linear(nn.Linear(16, 8, bias=False), sparsity=0.5)
    assert b.bias is None and not b.weight.is_meta and b.kept() == 8


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"sparsity": 1.0}, "sparsity must be in"),
        ({"sparsity": -0.1}, "sparsity must be in"),
        ({"sparsity": None}, "give sparsity"),
        ({"k": 17}, "k must be in"),
        ({"block": (3, 5)}, "must divide in_features"),
        ({"block": (9, 8)}, "block n must be in"),
        ({"block": (1,)}, "pair"),
        ({"backend": "gpu"}, "backend must be one of"),
    ],
)
def test_qsparse_linear_bad_args(kwargs, err):
    with pytest.raises(ValueError, match=err):
        QSparseLinear(16, 4, **kwargs)


def test_bitlinear_bad_args():
    with pytest.raises(ValueError, match="sparsity must be in"):
        BitLinear(16, 4, sparsity=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        BitLinear(16, 4, backend="nope")


# ---------------- BitLinear ----------------


def act_quant_published(x):
    """BitNet b1.58 ActQuant as published, literally."""
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


def weight_quant_published(w):
    """BitNet b1.58 WeightQuant as published, literally."""
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp_(-1, 1) / scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [None, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_bitlinear_training_forward_is_the_published_formula(backend, sparsity, bias, gen):
    m = BitLinear(96, 40, bias=bias, sparsity=sparsity, backend=backend)
    x = torch.randn(3, 4, 96, generator=gen) * 3
    xs = x if sparsity is None else R.topk_sparsify(x, qk.sparsity_to_k(96, sparsity))
    ref = F.linear(act_quant_published(xs), weight_quant_published(m.weight.detach()), m.bias)
    y = m(x)
    assert y.dtype == torch.float32 and torch.equal(y, ref)  # bit-exact


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitlinear_ste_gradients(backend, gen):
    m = BitLinear(32, 16, bias=True, sparsity=0.5, backend=backend)
    x = torch.randn(6, 32, generator=gen).requires_grad_(True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    xq = act_quant_published(R.topk_sparsify(x.detach(), 16))
    wq = weight_quant_published(m.weight.detach())
    torch.testing.assert_close(x.grad, g @ wq, rtol=1e-5, atol=1e-6)  # identity through both STEs
    torch.testing.assert_close(m.weight.grad, g.t() @ xq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.bias.grad, g.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity, bias", [(None, False), (0.5, True)])
def test_bitlinear_packed_agrees_with_training_mode(backend, sparsity, bias, gen):
    """Elementwise |y_train - y_packed| <= gamma(d + 10) * (|x_q| @ |t|^T * x_scale * scale + |b|)."""
    d, out = 128, 37
    m = BitLinear(d, out, bias=bias, sparsity=sparsity, backend=backend)
    x = torch.randn(9, d, generator=gen)
    w = m.weight.detach().clone()
    y_train = m(x).detach()
    m.pack()
    assert m.is_packed and "weight" not in dict(m.named_parameters()) and "packed=True" in repr(m)
    assert m.packed.dtype == torch.uint8 and m.packed.shape == (d, 10) and m.scale.shape == ()
    # Same codes and scale as the training-mode quantizer.
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    assert torch.equal(qk.unpack_ternary(m.packed, out).float(), (w * s).round().clamp(-1, 1))
    assert torch.equal(m.scale, w.abs().mean().clamp(min=1e-5))
    y_packed = m(x).detach()
    assert torch.equal(y_packed, qk.ternary_linear(x, m.packed, m.scale, out, m.kept(d), m.bias, backend="reference"))
    err = (y_train.double() - y_packed.double()).abs()
    assert bool((err <= packed_error_bound(m, x)).all())
    assert torch.isfinite(y_packed).all() and F.cosine_similarity(y_train.flatten(), y_packed.flatten(), 0) > 0.999


def test_bitlinear_pack_is_idempotent_and_inference_only():
    m = BitLinear(16, 8).pack()
    p = m.packed
    assert m.pack() is m and m.packed is p
    with pytest.raises(RuntimeError, match="packed"):
        m.reset_parameters()


def test_bitlinear_packed_state_dict_round_trip(gen):
    src = BitLinear(64, 30, bias=True, sparsity=0.5).pack()
    sd = src.state_dict()
    assert set(sd) == {"packed", "scale", "bias"}
    dst = BitLinear(64, 30, bias=True, sparsity=0.5)
    assert not dst.is_packed
    dst.load_state_dict(sd)
    assert dst.is_packed and "weight" not in dst.state_dict()
    x = torch.randn(4, 64, generator=gen)
    assert torch.equal(dst(x), src(x))
    # A float (training) checkpoint switches a packed module back to training mode.
    train = BitLinear(64, 30, bias=True, sparsity=0.5)
    dst.load_state_dict(train.state_dict())
    assert not dst.is_packed and torch.equal(dst(x), train(x))


def _bad_packed(mutate):
    sd = BitLinear(16, 7).pack().state_dict()
    mutate(sd)
    return sd


@pytest.mark.parametrize(
    "mutate, err",
    [
        (lambda sd: sd.__setitem__("packed", sd["packed"][:8]), r"'packed' has shape \[8, 2\].*\[16, 2\]"),
        (lambda sd: sd.__setitem__("packed", sd["packed"].to(torch.int16)), "'packed' must be a uint8"),
        (lambda sd: sd["packed"].__setitem__((3, 0), 0b11_01_01_01), "'packed' holds the invalid ternary code 3"),
        (lambda sd: sd["packed"].__setitem__((3, 1), 0b11_01_01_01), "'packed' holds the invalid ternary code 3"),
        (lambda sd: sd["packed"].__setitem__((0, 1), 0b10_01_01_01), "padding codes"),
        (lambda sd: sd.__setitem__("scale", torch.tensor(float("nan"))), "'scale' must be finite and > 0"),
        (lambda sd: sd.__setitem__("scale", torch.tensor(float("inf"))), "'scale' must be finite and > 0"),
        (lambda sd: sd.__setitem__("scale", torch.tensor(0.0)), "'scale' must be finite and > 0"),
        (lambda sd: sd.__setitem__("scale", torch.tensor(-1.0)), "'scale' must be finite and > 0"),
        (lambda sd: sd.__setitem__("scale", torch.tensor(1.0, dtype=torch.float64)), "'scale' must be a float32"),
        (lambda sd: sd.__setitem__("scale", torch.ones(2)), "'scale' must be a float32 scalar"),
        (lambda sd: sd.pop("scale"), "needs both 'packed' and 'scale'"),
    ],
)
def test_bitlinear_rejects_bad_packed_checkpoints(mutate, err):
    sd = _bad_packed(mutate)
    for target in (BitLinear(16, 7), BitLinear(16, 7).pack()):
        was_packed = target.is_packed
        with pytest.raises(RuntimeError, match=err):
            target.load_state_dict(sd)
        assert target.is_packed == was_packed  # the module was left as it was


def test_bitlinear_bad_key_is_named_with_its_prefix():
    model = nn.Sequential(BitLinear(16, 7))
    sd = {"0.packed": torch.full((16, 2), 0xFF, dtype=torch.uint8), "0.scale": torch.tensor(1.0)}
    with pytest.raises(RuntimeError, match="'0.packed' holds the invalid ternary code 3"):
        model.load_state_dict(sd)


def test_autocast_matches_nn_linear(gen):
    lin = nn.Linear(32, 16)
    m = QSparseLinear.from_linear(copy.deepcopy(lin), sparsity=0.0)
    b = BitLinear(32, 16, bias=True, sparsity=0.5).pack()
    x = torch.randn(4, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = lin(x)
        y = m(x)
        yb = b(x)
    assert y.dtype == want.dtype == yb.dtype == torch.bfloat16
    assert torch.equal(y, qk.sparse_linear(x.bfloat16(), m.weight.bfloat16(), 32, m.bias.bfloat16()))
    assert torch.equal(yb, b.to(torch.bfloat16)(x.bfloat16()))
    assert b.scale.dtype == torch.float32 and b.packed.dtype == torch.uint8  # .to(dtype) keeps the scale exact


def test_compile_fullgraph(gen):
    x = torch.randn(3, 32, generator=gen)
    for m in (QSparseLinear(32, 16), QSparseLinear(32, 16, block=(4, 8)), BitLinear(32, 16, sparsity=0.5),
              BitLinear(32, 16, sparsity=0.5).pack(), ReLU2GLU(32, 64)):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), m(x)), m


# ---------------- ReLU2 / ReLU2GLU ----------------


def test_relu2(gen):
    x = torch.randn(5, 7, generator=gen)
    assert torch.equal(ReLU2()(x), F.relu(x) ** 2)


@pytest.mark.parametrize("ternary", [False, True])
def test_relu2glu_composition(ternary, gen):
    f = ReLU2GLU(32, 64, sparsity={"gate": 0.4, "up": 0.4, "down": 0.6}, ternary=ternary)
    layer = BitLinear if ternary else QSparseLinear
    assert all(isinstance(p, layer) for p in (f.gate_proj, f.up_proj, f.down_proj))
    assert (f.gate_proj.sparsity, f.up_proj.sparsity, f.down_proj.sparsity) == (0.4, 0.4, 0.6)
    x = torch.randn(2, 3, 32, generator=gen)
    h = f.up_proj(x) * F.relu(f.gate_proj(x)) ** 2
    assert torch.equal(f(x), f.down_proj(h))
    if not ternary:
        assert torch.equal(f(x), qk.sparse_linear(h, f.down_proj.weight, qk.sparsity_to_k(64, 0.6)))
    with pytest.raises(ValueError, match="exactly the keys"):
        ReLU2GLU(8, 16, sparsity={"gate": 0.5})


# ---------------- a tiny model of each kind learns ----------------


def _tiny(kind: str) -> nn.Module:
    if kind == "qsparse":
        return nn.Sequential(QSparseLinear(16, 64, sparsity=0.5), ReLU2(), QSparseLinear(64, 4, sparsity=0.5))
    if kind == "block":
        return nn.Sequential(QSparseLinear(16, 64, block=(8, 16)), ReLU2(), QSparseLinear(64, 4, block=(8, 16)))
    if kind == "bitlinear":
        return nn.Sequential(BitLinear(16, 64, bias=True, sparsity=0.5), ReLU2(), BitLinear(64, 4, sparsity=0.5))
    if kind == "glu":
        return nn.Sequential(ReLU2GLU(16, 64, sparsity=0.5), nn.Linear(16, 4))
    if kind == "glu_ternary":
        return nn.Sequential(ReLU2GLU(16, 64, sparsity=0.5, ternary=True), nn.Linear(16, 4))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["qsparse", "block", "bitlinear", "glu", "glu_ternary"])
def test_tiny_model_trains(kind, gen, one_thread):
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(128, 16, generator=gen)
    with torch.no_grad():
        target = teacher(x)
    model = _tiny(kind)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_pruned_and_parametrized_parameters_are_used(gen):
    """forward reads its Parameters from the module's dict (fast path), but a pruned weight (a plain
    attribute recomputed by prune's hook) or a parametrized bias (a property) is what it uses."""
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    class Double(nn.Module):
        def forward(self, t):
            return t * 2

    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    qs = QSparseLinear.from_linear(nn.Linear(64, 32).to(torch.bfloat16), sparsity=0.5).eval()
    with torch.no_grad():
        prune.custom_from_mask(qs, "weight", torch.rand(32, 64, generator=gen) > 0.5)
        assert torch.equal(qs(x), qk.sparse_linear(x, qs.weight_orig * qs.weight_mask, 32, qs.bias))
        parametrize.register_parametrization(qs, "bias", Double())
        assert torch.equal(qs(x), qk.sparse_linear(x, qs.weight, 32, qs.parametrizations.bias.original * 2))
        bl = BitLinear.from_linear(nn.Linear(64, 32).to(torch.bfloat16), sparsity=0.5).pack().eval()
        parametrize.register_parametrization(bl, "bias", Double())
        b2 = bl.parametrizations.bias.original * 2
        assert torch.equal(bl(x), qk.ternary_linear(x, bl.packed, bl.scale, 32, 32, b2))
