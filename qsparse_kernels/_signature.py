"""The eager hot path's argument checks, run once per call signature.

The checks of :mod:`._validate` cost ~13 us (``sparse_linear``) to ~29 us (``ternary_linear``,
which also reads the scale's value) per call: more than the kernel at decode shapes. What they
look at, dtypes, devices, shapes and integer arguments, is the same call after call in a model,
so :func:`sparse_linear` and :func:`ternary_linear` remember each signature that passed and,
for it, check only what may change between calls of that signature (the batch size's effect on
the output size, and the scale's value when the scale tensor was modified). A new signature,
anything not a plain tensor or ``int`` (numpy integers, SymInts, subclasses) runs the full check;
a failing check is never remembered, so bad input raises the same error every time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as check

_PLAIN = (Tensor, torch.nn.Parameter)
_MAX_ENTRIES = 4096  # signatures (and scale tensors) remembered; cleared when full
_signatures: dict = {}
_scales: dict[int, tuple[Tensor, int | None]] = {}  # id(scale) -> (scale, its _version when checked)


def _remember(table: dict, key, value) -> None:
    if len(table) >= _MAX_ENTRIES:
        table.clear()
    table[key] = value


def _tensor_sig(t: Tensor | None):
    return None if t is None else (t.dtype, t.device, t.shape)


def _output_fits(x: Tensor, out_features: int) -> bool:
    d = x.shape[-1]
    return d > 0 and x.numel() <= check.MAX_NUMEL and (x.numel() // d) * out_features <= check.MAX_NUMEL


def sparse_linear(x, weight, k, bias) -> int:
    """:func:`._validate.sparse_linear` (same errors), remembered per signature; returns ``k``."""
    if (
        type(x) in _PLAIN
        and type(weight) in _PLAIN
        and type(k) is int
        and (bias is None or type(bias) in _PLAIN)
        and x.dim() >= 1
        and weight.dim() == 2
        and _output_fits(x, weight.shape[0])
    ):
        key = ("sparse_linear", x.dtype, x.device, x.shape[-1], weight.dtype, weight.device, weight.shape, k,
               _tensor_sig(bias))
        if key in _signatures:
            return k
        k = check.sparse_linear(x, weight, k, bias)
        _remember(_signatures, key, True)
        return k
    return check.sparse_linear(x, weight, k, bias)


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter: never remembered
        return None


def _scale_checked(scale: Tensor) -> bool:
    seen = _scales.get(id(scale))
    return seen is not None and seen[0] is scale and seen[1] is not None and seen[1] == _version(scale)


def ternary_linear(x, packed, scale, out_features, k, bias) -> tuple[int, int | None]:
    """:func:`._validate.ternary_linear` (same errors), remembered per signature; the scale's value
    is re-read only when the scale tensor is new or was modified in place (its ``_version``, and
    the remembered entry holds the tensor, so its id cannot be reused meanwhile).
    Returns ``(out_features, k)``."""
    if (
        type(x) in _PLAIN
        and type(packed) in _PLAIN
        and type(scale) in _PLAIN
        and type(out_features) is int
        and (k is None or type(k) is int)
        and (bias is None or type(bias) in _PLAIN)
        and x.dim() >= 1
        and _output_fits(x, out_features)
    ):
        key = ("ternary_linear", x.dtype, x.device, x.shape[-1], packed.dtype, packed.device, packed.shape,
               scale.dtype, scale.device, scale.shape, out_features, k, _tensor_sig(bias))
        if key in _signatures and _scale_checked(scale):
            return out_features, k
        result = check.ternary_linear(x, packed, scale, out_features, k, bias)
        _remember(_signatures, key, True)
        _remember(_scales, id(scale), (scale, _version(scale)))
        return result
    return check.ternary_linear(x, packed, scale, out_features, k, bias)
