"""Sibling projections: one call for several weights that read the same input (q/k/v, gate/up).

``sparse_linear_multi(x, weights, k, biases)[s]`` is ``sparse_linear(x, weights[s], k, biases[s])``
and ``ternary_linear_multi(x, packed, scales, out_features, k, biases)[s]`` is
``ternary_linear(x, packed[s], scales[s], out_features[s], k, biases[s])``, bit for bit (torch.equal),
on every backend. On the ``cpu`` backend the native kernels (``csrc/cpu/fused_linear.cpp``) do the
top-K (and, for ternary, the int8 quantization) once for all segments and run every segment in one
parallel region when ``x`` is one row (decode); other backends, and batches, run the single op per
segment (same results, no shared work). Each segment keeps its own weight tensor (no concatenated
copy) and gets its own output tensor (no views into a shared buffer).

:class:`qsparse_kernels.nn.QSparseLinear` / :class:`~qsparse_kernels.nn.BitLinear` siblings use
these through :mod:`qsparse_kernels.nn._siblings` after :func:`qsparse_kernels.convert`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.library import custom_op

from . import _ops
from . import _validate as check
from .backends import _module, select

SINGLE = {"sparse_linear_multi": "sparse_linear", "ternary_linear_multi": "ternary_linear"}


@functools.cache
def _native(backend_name: str, op: str):
    """The backend's native multi kernel for ``op`` (its module's ``MULTI_OPS``), or None."""
    return getattr(_module(backend_name), "MULTI_OPS", {}).get(op)


def implementation(op: str, backend: str, device: torch.device):
    """The function that runs multi op ``op`` (``"sparse_linear_multi"`` or ``"ternary_linear_multi"``)
    for ``backend`` on ``device``: the native kernel of the backend that runs the single op there,
    or a loop over that backend's single op."""
    name, single = select(SINGLE[op], backend, device)
    native = _native(name, op)
    return native if native is not None else functools.partial(_LOOPS[op], single)


def _sparse_loop(single, x, weights, k, biases):
    return [single(x, w, k, b) for w, b in zip(weights, biases, strict=True)]


def _ternary_loop(single, x, packed, scales, out_features, k, biases):
    return [single(x, p, s, n, k, b) for p, s, n, b in zip(packed, scales, out_features, biases, strict=True)]


_LOOPS = {"sparse_linear_multi": _sparse_loop, "ternary_linear_multi": _ternary_loop}


# ---- the registered ops (compiled graphs, tensor subclasses, modes); no autograd: see below ----
@custom_op("qsparse::sparse_linear_multi", mutates_args=())
def _sparse_linear_multi_op(
    x: Tensor, weights: Sequence[Tensor], k: int, biases: Sequence[Tensor | None], backend: str
) -> list[Tensor]:
    return list(implementation("sparse_linear_multi", backend, x.device)(x, list(weights), k, list(biases)))


@_sparse_linear_multi_op.register_fake
def _(x, weights, k, biases, backend):
    for w, b in zip(weights, biases, strict=True):
        check.sparse_linear(x, w, k, b)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


@custom_op("qsparse::ternary_linear_multi", mutates_args=())
def _ternary_linear_multi_op(
    x: Tensor,
    packed: Sequence[Tensor],
    scales: Sequence[Tensor],
    out_features: Sequence[int],
    k: int | None,
    biases: Sequence[Tensor | None],
    backend: str,
) -> list[Tensor]:
    fn = implementation("ternary_linear_multi", backend, x.device)
    return list(fn(x, list(packed), list(scales), list(out_features), k, list(biases)))


@_ternary_linear_multi_op.register_fake
def _(x, packed, scales, out_features, k, biases, backend):
    return [x.new_empty((*x.shape[:-1], n)) for n in out_features]


def _segments(op: str, name: str, seq, n: int | None = None) -> list:
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"qsparse_kernels.{op}: {name} must be a list or tuple, got {type(seq).__name__}")
    if n is not None and len(seq) != n:
        raise ValueError(f"qsparse_kernels.{op}: {name} must have one entry per segment ({n}), got {len(seq)}")
    return list(seq)


def sparse_linear_multi(
    x: Tensor,
    weights: Sequence[Tensor],
    k: int,
    biases: Sequence[Tensor | None] | None = None,
    *,
    backend: str = "auto",
) -> list[Tensor]:
    """``[sparse_linear(x, w, k, b) for w, b in zip(weights, biases, strict=True)]``, bit for bit, in one call.

    x: ``[..., in]``; weights: ``S`` tensors ``[out_s, in]`` of ``x``'s dtype (fastest column-major);
    biases: ``S`` entries ``[out_s]`` or None (``None``: no biases). Returns ``S`` tensors
    ``[..., out_s]``. With autograd needed it runs the differentiable single op per segment.
    """
    op = "sparse_linear_multi"
    weights = _segments(op, "weights", weights)
    biases = [None] * len(weights) if biases is None else _segments(op, "biases", biases, len(weights))
    for w, b in zip(weights, biases, strict=True):
        k = check.sparse_linear(x, w, k, b)
    if not _ops.direct_ok(x, *weights, *biases):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights, *biases)):
            return [_ops.sparse_linear(x, w, k, b, backend) for w, b in zip(weights, biases, strict=True)]
        return _sparse_linear_multi_op(x, weights, k, biases, backend)
    return list(implementation(op, backend, x.device)(x, weights, k, biases))


def ternary_linear_multi(
    x: Tensor,
    packed: Sequence[Tensor],
    scales: Sequence[Tensor],
    out_features: Sequence[int],
    k: int | None = None,
    biases: Sequence[Tensor | None] | None = None,
    *,
    backend: str = "auto",
) -> list[Tensor]:
    """``[ternary_linear(x, p, s, n, k, b) for ...]`` over the segments, bit for bit, in one call.

    x: ``[..., in]`` float; packed: ``S`` uint8 ``[in, ceil(out_s / 4)]``; scales: ``S`` float32
    scalars (each segment its own weight scale); out_features: ``S`` ints; k: kept count or None
    (dense); biases: ``S`` entries ``[out_s]`` in ``x.dtype`` or None. Returns ``S`` tensors
    ``[..., out_s]``. Inference only, as ``ternary_linear``.
    """
    op = "ternary_linear_multi"
    packed = _segments(op, "packed", packed)
    n = len(packed)
    scales = _segments(op, "scales", scales, n)
    out_features = _segments(op, "out_features", out_features, n)
    biases = [None] * n if biases is None else _segments(op, "biases", biases, n)
    kk = k
    for i in range(n):
        out_features[i], kk = check.ternary_linear(x, packed[i], scales[i], out_features[i], k, biases[i])
    if not _ops.direct_ok(x, *packed, *scales, *biases):
        return _ternary_linear_multi_op(x, packed, scales, out_features, kk, biases, backend)
    return list(implementation(op, backend, x.device)(x, packed, scales, out_features, kk, biases))


__all__ = ["sparse_linear_multi", "ternary_linear_multi"]
