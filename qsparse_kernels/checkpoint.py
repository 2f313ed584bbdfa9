"""Checkpoints of converted models in safetensors, the safe format (no pickle: loading runs no code).

:func:`save_checkpoint` writes ``model.state_dict()`` (packed ``BitLinear`` layers store their
uint8 codes and scale, about 8x smaller than bf16) plus, in the file's metadata, the sparsity
configuration of every Q-Sparse layer and the names of tied (aliased) tensors.
:func:`load_checkpoint` checks that configuration against the model (a mismatch names the layer),
then loads strictly (a missing, unexpected or mis-shaped key is named by ``load_state_dict``).
``torch.save(model.state_dict())`` works too, but loading it goes through pickle.
Needs the ``safetensors`` package (the ``hf`` extra); it is imported only when these functions run.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

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


def _check_layers(model: nn.Module, saved: dict[str, dict], path) -> None:
    have = layer_configs(model)
    for name in sorted(set(saved) | set(have)):
        s, h = saved.get(name), have.get(name)
        if s is None or h is None or s.get("type") != h["type"]:
            what = "a plain layer" if s is None else f"a {s.get('type')}"
            now = "a plain layer" if h is None else f"a {h['type']}"
            raise ValueError(
                f"qsparse_kernels.load_checkpoint: {os.fspath(path)!r} has {what} at {name!r}, "
                f"but the model has {now} there: convert the model with the checkpoint's QSparseConfig first"
            )
        for field in _COMPARED[1:]:
            sv, hv = s.get(field), h.get(field)
            if field == "block" and sv is not None:
                sv = tuple(sv)
            if sv != hv:
                raise ValueError(
                    f"qsparse_kernels.load_checkpoint: layer {name!r} was saved with {field}={sv!r}, "
                    f"but the model has {field}={hv!r}"
                )


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True):
    """Load a :func:`save_checkpoint` file into ``model`` (converted the same way); returns
    ``load_state_dict``'s ``(missing_keys, unexpected_keys)``.

    Raises ``ValueError`` when a Q-Sparse layer's configuration differs from the checkpoint's
    (naming the layer) and ``RuntimeError`` (from ``load_state_dict``) naming any key whose shape
    does not match, or that is missing or unexpected (``strict``). Packed ``BitLinear`` weights
    are validated (shape, dtype, no code 3, scale finite and > 0) before they are used.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if LAYERS_KEY in meta:
        _check_layers(model, json.loads(meta[LAYERS_KEY]), path)
    for alias, source in json.loads(meta.get(ALIASES_KEY, "{}")).items():
        state[alias] = state[source]
    return model.load_state_dict(state, strict=strict)


__all__ = ["save_checkpoint", "load_checkpoint", "layer_configs"]
