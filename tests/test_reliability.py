"""Reliability under bad configuration and adversarial arguments (issue 17).

Each test here failed before the fix it names: the import-time ISA variable, numpy scalars for
``k`` / ``sparsity``, the int32 range of the ternary accumulator, memory on empty inputs, non-finite
weights, atomic checkpoint loading, and top-K ties among NaNs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import qsparse_kernels as qk
from qsparse_kernels import _validate as check
from tests.numerics import check_nan_ties, nan_payload_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BUILT = qk.backend_info()["cpu"]["built"]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (the variable is read when the library loads)."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)


# ---- 1. QSPARSE_CPU_ISA is read while the shared object loads ----

_REPORT = "import qsparse_kernels as qk; from qsparse_kernels import _native; print(_native._C.cpu_isa()); " \
    "print(qk.backend_info()['cpu']['reason'])"


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
@pytest.mark.parametrize("value", ["AVX512", "garbage", " avx2"])
def test_invalid_cpu_isa_warns_and_uses_detected(value):
    # Before the fix the C++ parser threw while the .so loaded: terminate, exit code 134.
    detected = _python("from qsparse_kernels import _native; print(_native._C.cpu_isa())", QSPARSE_CPU_ISA="")
    assert detected.returncode == 0, detected.stderr
    got = _python(_REPORT, QSPARSE_CPU_ISA=value)
    assert got.returncode == 0, got.stderr
    isa, reason = got.stdout.splitlines()
    assert isa == detected.stdout.strip()
    assert f"QSPARSE_CPU_ISA={value!r}" in reason and "ignored" in reason
    assert "RuntimeWarning" in got.stderr and f"QSPARSE_CPU_ISA={value!r}" in got.stderr


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
def test_valid_cpu_isa_caps_without_warning():
    got = _python(_REPORT, QSPARSE_CPU_ISA="scalar")
    assert got.returncode == 0, got.stderr
    isa, reason = got.stdout.splitlines()
    assert isa == "scalar" and "warning" not in reason and "Warning" not in got.stderr


# ---- 7. numpy scalars for k / sparsity; hashable configs ----


@pytest.mark.parametrize("backend", ["reference", *(["cpu"] if CPU_BUILT else [])])
def test_numpy_integers_accepted_for_k(backend):
    x = torch.randn(3, 32)
    want = qk.topk_sparsify(x, 5, backend=backend)
    for k in (np.int64(5), np.int32(5), np.uint8(5)):
        assert torch.equal(qk.topk_sparsify(x, k, backend=backend), want)
    want = qk.block_topk_sparsify(x, 2, 8, backend=backend)
    assert torch.equal(qk.block_topk_sparsify(x, np.int64(2), np.int32(8), backend=backend), want)
    w = torch.randn(7, 32)
    assert torch.equal(qk.sparse_linear(x, w, np.int16(5), backend=backend), qk.sparse_linear(x, w, 5, backend=backend))
    packed, scale = qk.quantize_weight_ternary(w)
    assert torch.equal(
        qk.ternary_linear(x, packed, scale, np.int64(7), np.int64(5), backend=backend),
        qk.ternary_linear(x, packed, scale, 7, 5, backend=backend),
    )
    assert torch.equal(qk.unpack_ternary(packed, np.int64(7)), qk.unpack_ternary(packed, 7))


@pytest.mark.parametrize("bad", [True, np.True_, 5.0, np.float32(5), "5", torch.tensor(5)])
def test_k_refuses_non_integers(bad):
    with pytest.raises(TypeError, match="k must be an int"):
        qk.topk_sparsify(torch.randn(2, 8), bad)


def test_numpy_floats_accepted_for_sparsity():
    assert qk.sparsity_to_k(np.int64(10), np.float32(0.6)) == qk.sparsity_to_k(10, float(np.float32(0.6)))
    assert qk.sparsity_to_k(10, np.float64(0.5)) == 5
    assert qk.sparsity_to_k(10, np.int8(0)) == 10
    cfg = qk.QSparseConfig(sparsity=np.float32(0.5))
    assert type(cfg.sparsity) is float and cfg.sparsity == 0.5
    mod = qk.nn.QSparseLinear(16, 4, sparsity=np.float64(0.25), k=None)
    assert mod.kept() == 12
    assert qk.nn.QSparseLinear(16, 4, k=np.int64(3)).kept() == 3


@pytest.mark.parametrize("bad", [True, np.True_, "0.5", torch.tensor(0.5), None])
def test_sparsity_refuses_non_reals(bad):
    with pytest.raises(TypeError, match="sparsity must be a float"):
        qk.sparsity_to_k(10, bad)
    with pytest.raises(TypeError, match="sparsity"):
        qk.QSparseConfig(sparsity=bad)


def test_config_with_sparsity_mapping_is_hashable():
    a = qk.QSparseConfig(sparsity={"*.q_proj": 0.5, "*.down_proj": np.float32(0.6)})
    b = qk.QSparseConfig(sparsity={"*.q_proj": 0.5, "*.down_proj": 0.6000000238418579})
    assert hash(a) == hash(b) and a == b and {a: 1}[b] == 1
    # first match wins, so the order of the patterns is part of the value
    c = qk.QSparseConfig(sparsity={"*.down_proj": 0.6000000238418579, "*.q_proj": 0.5})
    assert a != c
    with pytest.raises(TypeError):
        a.sparsity["*.q_proj"] = 0.1
    assert dict(a.sparsity) == {"*.q_proj": 0.5, "*.down_proj": float(np.float32(0.6))}


# ---- 3. the int32 accumulator of ternary_linear ----

MAX_D = check.MAX_TERNARY_D
# Byte of a packed row with output 0 = +1 (code 2) and the padding codes 1 (zero) for outputs 1..3.
PLUS_ONE_BYTE = 2 | (1 << 2) | (1 << 4) | (1 << 6)


def _usable_backends():
    return [name for name, info in qk.backend_info().items() if info["usable"]]


def test_max_ternary_d_is_exact():
    assert 127 * MAX_D <= 2**31 - 1 < 127 * (MAX_D + 1)
    assert MAX_D == 16_909_320


@pytest.mark.parametrize("backend", ["reference", *(["cpu"] if CPU_BUILT else [])])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ternary_accumulator_exact_at_the_limit(backend, sign):
    # Every |x_q| = 127 and every t = +1: acc = +-127 * MAX_D = +-2,147,483,640, the extreme value.
    x = torch.full((1, MAX_D), sign)
    packed = torch.full((MAX_D, 1), PLUS_ONE_BYTE, dtype=torch.uint8)
    scale = torch.tensor(1.0)
    y = qk.ternary_linear(x, packed, scale, 1, backend=backend)
    x_scale = torch.tensor(1.0) / 127.0  # quantize_act_int8's x_scale for max|x| = 1
    want = torch.tensor(sign * 127 * MAX_D, dtype=torch.float32) * x_scale * scale
    assert torch.equal(y, want.reshape(1, 1)), (y, want)


@pytest.mark.parametrize("backend", _usable_backends())
def test_ternary_d_above_the_limit_is_refused(backend):
    d = MAX_D + 1
    x = torch.empty((0, d))  # validated on shapes alone: no row is computed
    packed = torch.full((d, 1), PLUS_ONE_BYTE, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"ternary_linear: x.shape\[-1\] = 16909321 is above 16909320"):
        qk.ternary_linear(x, packed, torch.tensor(1.0), 1, backend=backend)
    with pytest.raises(ValueError, match="is above 16909320"):  # also through the registered op (compile, autograd)
        qk.ternary_linear(x.requires_grad_(), packed, torch.tensor(1.0), 1, backend=backend)


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
def test_ternary_kernels_refuse_d_above_the_limit():
    # The kernels' own last line of defence, for a direct torch.ops call.
    from tests.cuda_emu import ops as emu_ops

    d = MAX_D + 1
    x, packed, scale = torch.empty((1, d)), torch.zeros((d, 1), dtype=torch.uint8), torch.tensor(1.0)
    for lib in (torch.ops.qsparse, emu_ops.library()):
        with pytest.raises(RuntimeError, match="the largest in_features whose int32 accumulator"):
            lib.ternary_linear_kernel(x, packed, scale, 1, None, None)


# ---- 6. memory on inputs without rows; the int32 caps on d, m and out_features ----

_EMPTY_INPUTS = """
import resource, torch, qsparse_kernels as qk
def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
w = torch.randn(64, 2**20, dtype=torch.bfloat16)  # 128 MiB, in the baseline
packed = torch.full((2**20, 64), 0x55, dtype=torch.uint8)  # 64 MiB: d = 2**20, out = 256
for b in {backends!r}:  # warm up every code path on small inputs first
    qk.topk_sparsify(torch.randn(2, 8), 3, backend=b)
    qk.block_topk_sparsify(torch.randn(2, 8), 1, 4, backend=b)
    qk.sparse_linear(torch.randn(2, 8, dtype=torch.bfloat16), w[:, :8], 3, backend=b)
    qk.ternary_linear(torch.randn(2, 8), packed[:8], torch.tensor(1.0), 256, 3, backend=b)
before = peak_mib()
for b in {backends!r}:
    assert qk.topk_sparsify(torch.empty(0, 2**27), 5, backend=b).shape == (0, 2**27)
    assert qk.topk_sparsify(torch.empty(3, 0, 2**27), 2**26, backend=b).shape == (3, 0, 2**27)
    assert qk.block_topk_sparsify(torch.empty(4, 0), 1, 2**31 - 1, backend=b).shape == (4, 0)
    assert qk.block_topk_sparsify(torch.empty(0, 2**27), 3, 2**26, backend=b).shape == (0, 2**27)
    assert qk.sparse_linear(torch.empty(0, 2**20, dtype=torch.bfloat16), w, 7, backend=b).shape == (0, 64)
    assert qk.ternary_linear(torch.empty(0, 2**20), packed, torch.tensor(1.0), 256, 9, backend=b).shape == (0, 256)
    assert qk.ternary_linear(torch.empty(0, 2**20), packed, torch.tensor(1.0), 256, backend=b).shape == (0, 256)
print(peak_mib() - before)
"""


def test_inputs_without_rows_allocate_nothing_proportional_to_d_or_m():
    # Before the fix the reference built an O(d) / O(m) index (1 GiB at d = 2**27, 16 GiB at
    # m = 2**31 - 1), a float32 copy of the weight (256 MiB) and the unpacked ternary weight (2 GiB).
    backends = ["reference", *(["cpu"] if CPU_BUILT else [])]
    got = _python(_EMPTY_INPUTS.format(backends=backends))
    assert got.returncode == 0, got.stderr
    assert float(got.stdout.strip()) < 32, f"peak memory grew by {got.stdout.strip()} MiB on inputs without rows"


ONE = torch.tensor(1.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: qk.topk_sparsify(torch.empty(0, 2**31), 1),
        lambda: qk.quantize_act_int8(torch.empty(0, 2**31)),
        lambda: qk.block_topk_sparsify(torch.empty(0, 2**31), 1, 2**31),
        lambda: qk.block_topk_sparsify(torch.empty(2, 0), 1, 2**31),
        lambda: qk.sparse_linear(torch.empty(0, 2**31), torch.empty(0, 2**31), 1),
        lambda: qk.sparse_linear(torch.empty(0, 0), torch.empty(2**31, 0), 0),
        lambda: qk.ternary_linear(torch.empty(0, 0), torch.empty((0, 2**29), dtype=torch.uint8), ONE, 2**31),
        lambda: qk.unpack_ternary(torch.empty(0, 2**29, dtype=torch.uint8), 2**31),
    ],
)
def test_dims_above_int32_indices_are_refused(call):
    with pytest.raises(ValueError, match=r"2\*\*31 - 1|2147483647"):
        call()


# ---- 2. weights must be finite: checked once where a weight enters a layer ----

NON_FINITE = [float("nan"), float("inf"), -float("inf")]


def _linear_with(value, dtype=torch.float32):
    lin = torch.nn.Linear(16, 8, dtype=dtype)
    with torch.no_grad():
        lin.weight[3, 5] = value
    return lin


@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_weights_are_refused_once(value):
    lin = _linear_with(value)
    with pytest.raises(ValueError, match=r"QSparseLinear.from_linear: linear.weight holds 1 non-finite .* \(3, 5\)"):
        qk.nn.QSparseLinear.from_linear(lin, sparsity=0.5)
    with pytest.raises(ValueError, match="BitLinear.from_linear: linear.weight holds 1 non-finite"):
        qk.nn.BitLinear.from_linear(lin, sparsity=0.5)
    with pytest.raises(ValueError, match="to_fast_layout: weight holds 1 non-finite"):
        qk.to_fast_layout(lin.weight)
    bit = qk.nn.BitLinear(16, 8)
    with torch.no_grad():
        bit.weight[0, 0] = value
    with pytest.raises(ValueError, match=r"BitLinear.pack: the weight of BitLinear\(in_features=16, out_features=8"):
        bit.pack()
    assert not bit.is_packed and torch.isfinite(bit.weight).sum() == bit.weight.numel() - 1


@pytest.mark.parametrize("weights", ["dense", "ternary"])
def test_convert_names_the_layer_with_a_non_finite_weight(weights):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), _linear_with(float("nan")))
    cfg = qk.QSparseConfig(sparsity=0.5, weights=weights)
    with pytest.raises(ValueError, match=r"convert: layer '2'.*non-finite"):
        qk.convert(model, cfg)
    assert all(type(m) is not qk.nn.QSparseLinear and type(m) is not qk.nn.BitLinear for m in model)


def test_finite_check_skips_meta_weights():
    lin = torch.nn.Linear(16, 8, device="meta")
    assert qk.nn.QSparseLinear.from_linear(lin, sparsity=0.5).weight.device.type == "meta"
    assert qk.to_fast_layout(lin.weight).stride(0) == 1


# ---- 5. checkpoint loading is atomic; malformed files give errors naming the key ----

LAYERS, ALIASES = "qsparse_kernels.layers", "qsparse_kernels.aliases"
LAST = "layers.1.mlp.down_proj"  # the last Q-Sparse layer: a non-atomic loader has written the rest


def _snapshot(model):
    state = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    kinds = [(n, type(m).__name__, getattr(m, "is_packed", None)) for n, m in model.named_modules()]
    return state, kinds


def _same(model, snap) -> bool:
    state, kinds = _snapshot(model)
    if kinds != snap[1] or state.keys() != snap[0].keys():
        return False
    return all(torch.equal(v, snap[0][k][0]) and s == snap[0][k][1] for k, (v, s) in state.items())


def _meta(layers=None, aliases=None):
    def edit(meta, tensors):
        if layers is not None:
            meta[LAYERS] = layers(json.loads(meta[LAYERS])) if callable(layers) else layers
            meta[LAYERS] = meta[LAYERS] if isinstance(meta[LAYERS], str) else json.dumps(meta[LAYERS])
        if aliases is not None:
            meta[ALIASES] = aliases if isinstance(aliases, str) else json.dumps(aliases)

    return edit


def _set(d, key, value):
    d[key] = value
    return d


def _tensor(fn):
    return lambda meta, tensors: fn(tensors)


TAMPERED = {
    # metadata
    "layers not JSON": (_meta(layers="{"), ValueError, r"metadata key 'qsparse_kernels.layers' is not valid JSON"),
    "layers a list": (_meta(layers="[]"), ValueError, r"'qsparse_kernels.layers' must hold a JSON object, got list"),
    "layer not an object": (
        _meta(layers=lambda d: _set(d, LAST, 5)), ValueError, rf"layer '{LAST}': must be a JSON object, got int"
    ),
    "layer without k": (
        _meta(layers=lambda d: _set(d, LAST, {"type": "QSparseLinear", "sparsity": 0.6, "block": None})),
        ValueError, rf"layer '{LAST}': has no 'k'"),
    "unknown type": (
        _meta(layers=lambda d: _set(d, LAST, {**d[LAST], "type": "Linear8bit"})), ValueError, r"'type' must be one of"
    ),
    "sparsity a string": (
        _meta(layers=lambda d: _set(d, LAST, {**d[LAST], "sparsity": "0.6"})), ValueError, r"'sparsity' must be a"
    ),
    "block not a pair": (
        _meta(layers=lambda d: _set(d, LAST, {**d[LAST], "block": [16]})), ValueError, r"'block' must be a pair"),
    "block of strings": (
        _meta(layers=lambda d: _set(d, LAST, {**d[LAST], "block": "ab"})), ValueError, r"'block' must be a pair"),
    "config differs at the last layer": (
        _meta(layers=lambda d: _set(d, LAST, {**d[LAST], "sparsity": 0.3})), ValueError,
        rf"layer '{LAST}' was saved with sparsity=0.3"),
    "no layer metadata": (lambda meta, tensors: meta.pop(LAYERS), ValueError, r"has no 'qsparse_kernels.layers' meta"),
    "aliases not JSON": (_meta(aliases="nope"), ValueError, r"key 'qsparse_kernels.aliases' is not valid JSON"),
    "alias to a missing tensor": (
        _meta(aliases={"extra.weight": "nowhere.weight"}), ValueError, r"alias 'extra.weight': names 'nowhere.weight'"),
    "alias to a number": (_meta(aliases={"extra.weight": 3}), ValueError, r"alias 'extra.weight': must name a stored"),
    # tensors
    "NaN weight in the last layer": (
        _tensor(lambda t: t[LAST + ".weight"].view(-1).__setitem__(7, float("nan"))), ValueError,
        rf"'{LAST}.weight' holds 1 non-finite"),
    "Inf weight in the last layer": (
        _tensor(lambda t: t[LAST + ".weight"].view(-1).__setitem__(0, -float("inf"))), ValueError,
        rf"'{LAST}.weight' holds 1 non-finite"),
    "shape of the last layer": (
        _tensor(lambda t: t.__setitem__(LAST + ".weight", t[LAST + ".weight"][:, :-1].contiguous())), RuntimeError,
        rf"size mismatch for {LAST}.weight"),
    "missing key": (_tensor(lambda t: t.pop("norm.bias")), RuntimeError, r"Missing key\(s\) in state_dict: 'norm.b"),
    "unexpected key": (
        _tensor(lambda t: t.__setitem__("zz.weight", torch.ones(2))), RuntimeError, r"Unexpected key.*'zz.weight'"),
}
TAMPERED_PACKED = {
    "code 3 in the last layer": (
        _tensor(lambda t: t[LAST + ".packed"].view(-1).__setitem__(0, 0xFF)), RuntimeError,
        rf"'{LAST}.packed' holds the invalid ternary code 3"),
    "NaN scale in the last layer": (
        _tensor(lambda t: t.__setitem__(LAST + ".scale", torch.tensor(float("nan")))), RuntimeError,
        rf"'{LAST}.scale' must be finite and > 0"),
    "scale missing": (_tensor(lambda t: t.pop(LAST + ".scale")), RuntimeError, rf"needs both '{LAST}.packed' and"),
}


def _tamper(tmp_path, config, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tests.test_convert import TinyLM

    path = tmp_path / "m.safetensors"
    qk.save_checkpoint(qk.convert(TinyLM(), config), path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


def _check_rejected_untouched(path, config, cls, match):
    from tests.test_convert import TinyLM

    model = qk.convert(TinyLM(), config)
    snap = _snapshot(model)
    with pytest.raises(cls, match=match) as info:
        qk.load_checkpoint(model, path)
    assert type(info.value) is cls  # never a bare TypeError / KeyError / JSONDecodeError
    assert _same(model, snap), "a rejected checkpoint changed the model"


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_checkpoint_is_rejected_and_model_untouched(case, tmp_path):
    config = qk.QSparseConfig(sparsity=0.6)
    edit, cls, match = TAMPERED[case]
    _check_rejected_untouched(_tamper(tmp_path, config, edit), config, cls, match)


@pytest.mark.parametrize("case", list(TAMPERED_PACKED))
def test_tampered_packed_checkpoint_is_rejected_and_model_untouched(case, tmp_path):
    saved = qk.QSparseConfig(sparsity=0.6, weights="ternary", pack=True)
    edit, cls, match = TAMPERED_PACKED[case]
    # the model is in training mode (float weights): a non-atomic loader switches layers to packed
    _check_rejected_untouched(
        _tamper(tmp_path, saved, edit), qk.QSparseConfig(sparsity=0.6, weights="ternary"), cls, match
    )


def test_unreadable_file_names_the_path(tmp_path):
    from tests.test_convert import TinyLM

    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"junk.safetensors': not a readable safetensors file"):
        qk.load_checkpoint(qk.convert(TinyLM(), qk.QSparseConfig()), path)


def test_file_without_layer_metadata_loads_when_asked(tmp_path):
    from safetensors.torch import load_file

    from tests.test_convert import TinyLM

    config = qk.QSparseConfig(sparsity=0.6)
    path = _tamper(tmp_path, config, lambda meta, tensors: meta.pop(LAYERS))
    model = qk.convert(TinyLM(), config)
    assert qk.load_checkpoint(model, path, check_config=False) == ([], [])
    for key, t in load_file(str(path)).items():
        assert torch.equal(model.state_dict()[key], t), key


# ---- 4. top-K ties among NaNs of any payload: the lowest index wins on every backend ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_keeps_lowest_index_among_nans(dtype):
    check_nan_ties(lambda x, k: qk.topk_sparsify(x, k, backend="reference"), dtype)


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_keeps_lowest_index_among_nans(isa, dtype):
    from qsparse_kernels import _native

    _native._C.set_cpu_isa_cap(isa)
    try:
        check_nan_ties(lambda x, k: qk.topk_sparsify(x, k, backend="cpu"), dtype)
        # the fused kernels select with the same routine: a row with a kept NaN is NaN everywhere
        for x, k in nan_payload_cases(dtype)[:6]:
            w = torch.randn(5, x.shape[-1]).to(dtype)
            assert torch.isnan(qk.sparse_linear(x, w, k, backend="cpu")).all()
    finally:
        _native._C.set_cpu_isa_cap("")


@pytest.mark.skipif(not CPU_BUILT, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulated_cuda_keeps_lowest_index_among_nans(dtype):
    from tests.cuda_emu import ops as emu_ops

    check_nan_ties(emu_ops.topk_sparsify, dtype)
