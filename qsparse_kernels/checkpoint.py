"""Checkpoints of converted models in safetensors, the safe format (no pickle: loading runs no code).

:func:`save_checkpoint` writes ``model.state_dict()`` (packed ``BitLinear`` layers store their
uint8 codes and scale, about 8x smaller than bf16) plus, in the file's metadata, the sparsity
configuration of every Q-Sparse layer and the names of tied (aliased) tensors.
:func:`load_checkpoint` checks the file completely (metadata, that configuration against the model,
keys, shapes, packed codes, finite weights: every error names the key or layer) and only then loads
it, so a rejected file leaves the model untouched.
``torch.save(model.state_dict())`` works too, but loading it goes through pickle.
Needs the ``safetensors`` package (the ``hf`` extra); it is imported only when these functions run.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from . import _validate as check
from .nn import BitLinear, QSparseLinear

LAYERS_KEY = "qsparse_kernels.layers"
ALIASES_KEY = "qsparse_kernels.aliases"
_COMPARED = ("type", "sparsity", "k", "block")


def layer_configs(model: nn.Module) -> dict[str, dict]:
    """``{qualified name: config}`` of every ``QSparseLinear`` / ``BitLinear`` in ``model``."""
    return {name: m.config() for name, m in model.named_modules() if isinstance(m, (QSparseLinear, BitLinear))}


def _tensors_and_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous copies for safetensors; exact aliases (tied weights) stored once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        c = t.contiguous().cpu()
        if c.numel() and c.untyped_storage().data_ptr() in storages:  # overlapping views: store a copy
            c = c.clone()
        if c.numel():
            storages.add(c.untyped_storage().data_ptr())
        tensors[name] = c
    return tensors, aliases


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model.state_dict()`` to ``path`` as safetensors, with the Q-Sparse layer configs."""
    from safetensors.torch import save_file

    tensors, aliases = _tensors_and_aliases(model.state_dict())
    meta = {"format": "pt", LAYERS_KEY: json.dumps(layer_configs(model)), ALIASES_KEY: json.dumps(aliases)}
    save_file(tensors, os.fspath(path), metadata=meta)


_TYPES = ("QSparseLinear", "BitLinear")


class _Reader:
    """Turns what a file holds into checked Python values; every error names the file and the key."""

    def __init__(self, path) -> None:
        self.path = os.fspath(path)

    def error(self, msg: str) -> ValueError:
        return ValueError(f"qsparse_kernels.load_checkpoint: {self.path!r}: {msg}")

    def json_object(self, meta: dict, key: str) -> dict:
        try:
            value = json.loads(meta[key])
        except (TypeError, ValueError) as exc:  # ValueError covers json.JSONDecodeError
            raise self.error(f"metadata key {key!r} is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise self.error(f"metadata key {key!r} must hold a JSON object, got {type(value).__name__}")
        return value

    def layer_config(self, name: str, cfg) -> dict:
        """One layer's saved config as a :meth:`QSparseLinear.config` dict, or a ValueError naming it."""
        where = f"metadata key {LAYERS_KEY!r}, layer {name!r}"
        if not isinstance(cfg, dict):
            raise self.error(f"{where}: must be a JSON object, got {type(cfg).__name__}")
        missing = [f for f in _COMPARED if f not in cfg]
        if missing:
            raise self.error(f"{where}: has no {missing[0]!r}")
        if cfg["type"] not in _TYPES:
            raise self.error(f"{where}: 'type' must be one of {_TYPES}, got {cfg['type']!r}")
        s, k, block = cfg["sparsity"], cfg["k"], cfg["block"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
            raise self.error(f"{where}: 'sparsity' must be a number or null, got {s!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
            raise self.error(f"{where}: 'k' must be an integer or null, got {k!r}")
        if block is not None:
            ok = isinstance(block, list) and len(block) == 2
            if not ok or any(isinstance(v, bool) or not isinstance(v, int) for v in block):
                raise self.error(f"{where}: 'block' must be a pair of integers or null, got {block!r}")
            block = tuple(block)
        return {"type": cfg["type"], "sparsity": s, "k": k, "block": block}

    def layers(self, meta: dict) -> dict[str, dict]:
        saved = self.json_object(meta, LAYERS_KEY)
        return {name: self.layer_config(name, cfg) for name, cfg in saved.items()}

    def aliases(self, meta: dict, tensors: dict) -> dict[str, str]:
        if ALIASES_KEY not in meta:
            return {}
        out = {}
        for alias, source in self.json_object(meta, ALIASES_KEY).items():
            where = f"metadata key {ALIASES_KEY!r}, alias {alias!r}"
            if not isinstance(source, str):
                raise self.error(f"{where}: must name a stored tensor, got {source!r}")
            if source not in tensors:
                raise self.error(f"{where}: names {source!r}, which the file does not hold")
            if alias in tensors:
                raise self.error(f"{where}: is also a stored tensor")
            out[alias] = source
        return out


def _check_layers(model: nn.Module, saved: dict[str, dict], path) -> None:
    have = layer_configs(model)
    for name in sorted(set(saved) | set(have)):
        s, h = saved.get(name), have.get(name)
        if s is None or h is None or s["type"] != h["type"]:
            what = "a plain layer" if s is None else f"a {s['type']}"
            now = "a plain layer" if h is None else f"a {h['type']}"
            raise ValueError(
                f"qsparse_kernels.load_checkpoint: {os.fspath(path)!r} has {what} at {name!r}, "
                f"but the model has {now} there: convert the model with the checkpoint's QSparseConfig first"
            )
        for field in _COMPARED[1:]:
            sv, hv = s[field], h[field]
            if sv != hv:
                raise ValueError(
                    f"qsparse_kernels.load_checkpoint: layer {name!r} was saved with {field}={sv!r}, "
                    f"but the model has {field}={hv!r}"
                )


def _expected_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """What ``model.load_state_dict(state)`` would write: ``{key: target tensor or None}``, where a
    ``BitLinear`` switches mode to the file's (packed keys replace ``weight`` or the other way round;
    None: checked by ``BitLinear._packed_problem``), and the problems with packed weights found."""
    want: dict = dict(model.state_dict(keep_vars=True))
    problems = []
    for prefix, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, BitLinear):
            continue
        p = prefix + "." if prefix else ""
        pk, sk, wk = p + "packed", p + "scale", p + "weight"
        if pk in state or sk in state:
            want.pop(wk, None)
            want[pk] = want[sk] = None
            problem = mod._packed_problem(state, pk, sk)
            if problem is not None:
                problems.append(problem)
        elif wk in state and mod.is_packed:
            want.pop(pk, None)
            want.pop(sk, None)
            want[wk] = torch.empty((mod.out_features, mod.in_features), device="meta")
    return want, problems


def _validate_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool, path) -> None:
    """Everything ``load_state_dict`` would reject, and non-finite Q-Sparse weights, before any write."""
    want, problems = _expected_state(model, state)
    for key in sorted(set(want) & set(state)):
        target, got = want[key], state[key]
        if isinstance(target, torch.Tensor) and tuple(got.shape) != tuple(target.shape):
            problems.append(
                f"size mismatch for {key}: copying a param with shape {got.shape} from checkpoint, "
                f"the shape in current model is {target.shape}."
            )
    if strict:
        missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        if unexpected:
            problems.insert(0, "Unexpected key(s) in state_dict: " + ", ".join(map(repr, unexpected)) + ". ")
        if missing:
            problems.insert(0, "Missing key(s) in state_dict: " + ", ".join(map(repr, missing)) + ". ")
    if problems:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(model).__name__} from {os.fspath(path)!r} "
            "(qsparse_kernels.load_checkpoint, nothing was written):\n\t" + "\n\t".join(problems)
        )
    for name, mod in model.named_modules():
        if isinstance(mod, (QSparseLinear, BitLinear)):
            key = (name + "." if name else "") + "weight"
            if key in state:
                check.finite_weight("load_checkpoint", f"{os.fspath(path)!r}: {key!r}", state[key])


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True, *, check_config: bool = True):
    """Load a :func:`save_checkpoint` file into ``model`` (converted the same way); returns
    ``load_state_dict``'s ``(missing_keys, unexpected_keys)``.

    Atomic: the file is read and checked completely before anything is written, so on any error
    the model is left as it was. Raises ``ValueError`` for malformed metadata (naming the key), a
    Q-Sparse layer whose configuration differs from the checkpoint's (naming the layer), and a
    Q-Sparse layer weight that is not finite (naming the key); ``RuntimeError`` (as
    ``load_state_dict``) naming every key whose shape does not match, or that is missing or
    unexpected (``strict``), or whose packed ``BitLinear`` weight is invalid (shape, dtype, code 3,
    padding, scale finite and > 0). A file without the layer-config metadata (not written by
    :func:`save_checkpoint`) is a ``ValueError`` unless ``check_config=False`` says to load its
    tensors without that check.
    """
    from safetensors import SafetensorError, safe_open

    read = _Reader(path)
    try:
        with safe_open(read.path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise read.error(f"not a readable safetensors file ({exc})") from None
    if check_config:
        if LAYERS_KEY not in meta:
            raise read.error(
                f"has no {LAYERS_KEY!r} metadata (it was not written by save_checkpoint), so the layers' "
                "sparsity configuration cannot be checked; pass check_config=False to load its tensors anyway"
            )
        _check_layers(model, read.layers(meta), path)
    for alias, source in read.aliases(meta, state).items():
        state[alias] = state[source]
    _validate_state(model, state, strict, path)
    return model.load_state_dict(state, strict=strict)


__all__ = ["save_checkpoint", "load_checkpoint", "layer_configs"]
