"""Hugging Face transformers integration: converted models save and load with ``save_pretrained`` /
``from_pretrained`` as the quantization method ``"qsparse_kernels"``.

* ``qk.convert(model, ...)`` on a transformers model attaches a :class:`QSparseHfQuantizer`, so
  ``model.save_pretrained(d)`` writes ``quantization_config`` into ``config.json``: every converted
  layer's settings (:func:`layer_entry`), refreshed at save time (a layer packed after
  ``convert`` is saved as packed).
* ``import qsparse_kernels`` registers the method (lazily, :mod:`._hf_hook`), so
  ``AutoModelForCausalLM.from_pretrained(d)`` in a fresh process builds the model on the meta
  device, swaps in the Q-Sparse layers before any weight is read, and loads the stored tensors
  (dense ``weight``, or packed ``packed`` / ``scale``) straight into them: no float copy of a
  packed layer ever exists, so peak memory is about the checkpoint's size.
* Before loading, the safetensors headers are checked against the config: a converted layer
  whose tensors are missing, mis-shaped or of the wrong dtype, or a packed tensor for a layer the
  config does not list, is a ``ValueError`` naming the layer, never a randomly initialised weight.
  After loading, packed weights are validated like ``BitLinear.load_state_dict`` does (no code 3,
  padding, scale finite and > 0) and dense weights go to the fast column-major layout.

Without ``import qsparse_kernels`` transformers does not know the method: it warns "Unknown
quantization type" and loads plain ``nn.Linear`` layers with missing weights. Import the library
first.

Needs transformers >= 5 (the ``hf`` extra). Shapes: every layer keeps ``[..., in] -> [..., out]``.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .layout import packed_shape
from .nn import BitLinear, QSparseLinear
from .nn import _config as cfg
from .nn._siblings import group_siblings

QUANT_METHOD = "qsparse_kernels"
FORMAT_VERSION = 1
LAYER_TYPES = {"QSparseLinear": QSparseLinear, "BitLinear": BitLinear}
_ENTRY_KEYS = ("type", "in_features", "out_features", "bias", "sparsity", "k", "block", "backend", "packed")


def layer_entry(mod: QSparseLinear | BitLinear) -> dict:
    """What ``quantization_config.layers[name]`` holds for one layer (JSON-ready)."""
    packed = isinstance(mod, BitLinear) and mod.is_packed
    block = getattr(mod, "block", None)
    return {
        "type": type(mod).__name__,
        "in_features": mod.in_features,
        "out_features": mod.out_features,
        "bias": mod.bias is not None,
        "sparsity": None if block is not None else mod.sparsity,
        "k": mod.k,
        "block": list(block) if block is not None else None,
        "backend": mod.backend,
        "packed": packed,
    }


def layer_entries(model: nn.Module) -> dict[str, dict]:
    """``{qualified name: layer_entry}`` of every Q-Sparse layer of ``model``."""
    return {name: layer_entry(m) for name, m in model.named_modules() if isinstance(m, (QSparseLinear, BitLinear))}


def _err(msg: str) -> ValueError:
    return ValueError(f"qsparse_kernels (from_pretrained): {msg}")


def _check_entry(name: str, entry) -> None:
    if not isinstance(entry, dict) or set(entry) != set(_ENTRY_KEYS):
        raise _err(f"quantization_config.layers[{name!r}] must have the keys {list(_ENTRY_KEYS)}, got {entry!r}")
    if entry["type"] not in LAYER_TYPES:
        raise _err(f"layer {name!r} has type {entry['type']!r}; known types: {list(LAYER_TYPES)}")
    if entry["packed"] and entry["type"] != "BitLinear":
        raise _err(f"layer {name!r}: only a BitLinear can be packed")


class QSparseQuantConfig(QuantizationConfigMixin):
    """``quantization_config`` of a converted model (``config.json``).

    Args:
        layers: ``{qualified module name: entry}``, one entry per converted layer with the keys
            ``type`` (``"QSparseLinear"`` / ``"BitLinear"``), ``in_features``, ``out_features``,
            ``bias``, ``sparsity``, ``k``, ``block`` (``[n, m]`` or null), ``backend``, ``packed``.
        version: the format version (1).
    """

    def __init__(self, layers: dict | None = None, version: int = FORMAT_VERSION, **kwargs) -> None:
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"qsparse_kernels: quant_method must be {QUANT_METHOD!r}, got {method!r}")
        if kwargs:
            raise ValueError(f"qsparse_kernels: unknown quantization_config field(s) {sorted(kwargs)}")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"qsparse_kernels: quantization_config version {version!r} is not supported by this "
                f"version of the library (it reads version {FORMAT_VERSION})"
            )
        self.quant_method = QUANT_METHOD
        self.version = version
        self.layers = dict(layers or {})
        for name, entry in self.layers.items():
            _check_entry(name, entry)


def _build(entry: dict, dtype: torch.dtype) -> nn.Module:
    """An empty Q-Sparse layer on the meta device as ``entry`` describes."""
    kw = dict(bias=entry["bias"], backend=entry["backend"], device="meta", dtype=dtype)
    sparsity, k = entry["sparsity"], entry["k"]
    if entry["type"] == "QSparseLinear":
        block = tuple(entry["block"]) if entry["block"] is not None else None
        return QSparseLinear(entry["in_features"], entry["out_features"], sparsity=sparsity, k=k, block=block, **kw)
    mod = BitLinear(entry["in_features"], entry["out_features"], sparsity=sparsity, k=k, **kw)
    if entry["packed"]:
        mod._to_packed_mode()
    return mod


def _expected_tensors(entry: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{suffix: (shape, dtype kind)}`` a layer's checkpoint must hold; kind "float" or a safetensors dtype."""
    i, o = entry["in_features"], entry["out_features"]
    if entry["packed"]:
        want = {"packed": (packed_shape(i, o), "U8"), "scale": ((), "F32")}
    else:
        want = {"weight": ((o, i), "float")}
    if entry["bias"]:
        want["bias"] = ((o,), "float")
    return want


_FLOAT_KINDS = ("F32", "F16", "BF16", "F64")
_LAYER_SUFFIXES = ("weight", "bias", "packed", "scale")


def _headers(files) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for key in h.keys():
                s = h.get_slice(key)
                out[key] = (tuple(s.get_shape()), s.get_dtype())
    return out


def check_checkpoint(files, layers: dict[str, dict]) -> None:
    """Compare the safetensors ``files``' headers with ``layers`` (no tensor is read); a mismatch
    raises ``ValueError`` naming the layer and the key."""
    files = [os.fspath(f) for f in files or []]
    if not files:
        return
    if not all(f.endswith(".safetensors") for f in files):
        raise _err(f"a qsparse_kernels checkpoint is loaded from safetensors files, got {files}")
    heads = _headers(files)
    for name, entry in layers.items():
        want = _expected_tensors(entry)
        for suffix in _LAYER_SUFFIXES:
            key = f"{name}.{suffix}"
            if suffix not in want:
                if key in heads:
                    raise _err(
                        f"the checkpoint has {key!r}, but quantization_config says layer {name!r} is a "
                        f"{'packed ' if entry['packed'] else ''}{entry['type']}"
                        f"{' without bias' if suffix == 'bias' else ''}: the file and its config.json do not match"
                    )
                continue
            shape, kind = want[suffix]
            if key not in heads:
                raise _err(f"the checkpoint has no {key!r}, which layer {name!r} ({entry['type']}) needs")
            got_shape, got_dtype = heads[key]
            ok_dtype = got_dtype in _FLOAT_KINDS if kind == "float" else got_dtype == kind
            if got_shape != shape or not ok_dtype:
                raise _err(
                    f"{key!r} is {got_dtype} of shape {list(got_shape)}, but layer {name!r} "
                    f"({entry['in_features']} -> {entry['out_features']}) needs "
                    f"{'a float' if kind == 'float' else kind} tensor of shape {list(shape)}"
                )
    listed_packed = {n for n, e in layers.items() if e["packed"]}
    for key in heads:
        prefix, _, suffix = key.rpartition(".")
        if suffix == "packed" and prefix not in listed_packed:
            raise _err(
                f"the checkpoint has the packed tensor {key!r}, but quantization_config does not list "
                f"{prefix!r} as a packed layer: the file and its config.json do not match"
            )


def _target(model: nn.Module, name: str) -> str:
    """``name`` as it is in ``model`` (a checkpoint saved from a head model loads into its base too)."""
    prefix = getattr(model, "base_model_prefix", "")
    for cand in (name, name.removeprefix(f"{prefix}.") if prefix else name, f"{prefix}.{name}" if prefix else name):
        try:
            model.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    raise _err(f"quantization_config lists layer {name!r}, but the model has no module of that name")


class QSparseHfQuantizer(HfQuantizer):
    """The ``"qsparse_kernels"`` quantizer: loads converted checkpoints (see the module docstring).

    Converting a float checkpoint while loading is not offered (``requires_calibration``): load
    it, then call :func:`qsparse_kernels.convert`.
    """

    requires_calibration = True
    quantization_config: QSparseQuantConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        layers = self.quantization_config.layers
        swaps = {}
        for name, entry in layers.items():  # the model's structure first, then the files, then the swap
            where = _target(model, name)
            old = model.get_submodule(where)
            shape = (entry["in_features"], entry["out_features"])
            if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != shape:
                raise _err(
                    f"layer {name!r} is {shape[0]} -> {shape[1]} in quantization_config, but the model has "
                    f"{old!r} there"
                )
            swaps[where] = _build(entry, old.weight.dtype)
        check_checkpoint(checkpoint_files, layers)
        for where, mod in swaps.items():
            model.set_submodule(where, mod)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, mod in model.named_modules():
            if isinstance(mod, QSparseLinear):
                cfg.relayout_(mod.weight)
            elif isinstance(mod, BitLinear) and mod.is_packed:
                pk, sk = f"{name}.packed", f"{name}.scale"
                problem = mod._packed_problem({pk: mod.packed, sk: mod.scale}, pk, sk)
                if problem is not None:
                    raise _err(problem)
        group_siblings(model)  # q/k/v and gate/up share one kernel call, as after convert()
        from .convert import use_dense_head, use_fast_norm

        use_dense_head(model)  # the dense output head through the library's GEMV, as after convert()
        use_fast_norm(model)  # its RMSNorms in one kernel call each, as after convert()
        return model

    def get_state_dict_and_metadata(self, model):
        """At ``save_pretrained``: the config gets every layer's current settings."""
        self.quantization_config.layers = layer_entries(model)
        model.config.quantization_config = self.quantization_config
        return None, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        from .convert import unconvert

        return unconvert(model)


def register() -> None:
    """Register the config and the quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QSparseQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QSparseHfQuantizer)


def attach(model: nn.Module) -> None:
    """Give a converted transformers model its quantizer and ``quantization_config`` (so
    ``save_pretrained`` writes them); with no Q-Sparse layer left, take them away."""
    register()
    layers = layer_entries(model)
    if not layers:
        if isinstance(getattr(model, "hf_quantizer", None), QSparseHfQuantizer):
            del model.hf_quantizer
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        return
    config = QSparseQuantConfig(layers=layers)
    model.hf_quantizer = QSparseHfQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config
    if hasattr(model, "quantization_method"):  # loaded with another method (a BitNet checkpoint)
        model.quantization_method = QUANT_METHOD


__all__ = ["QSparseQuantConfig", "QSparseHfQuantizer", "register", "attach", "layer_entries", "check_checkpoint"]
