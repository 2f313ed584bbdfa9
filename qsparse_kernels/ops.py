"""Public functional API. Each function checks its arguments and makes one call of the registered
op (``torch.ops.qsparse.*``), or, for eager inference on plain tensors, of the implementation that
op would select (same result, without the dispatcher's overhead; see :func:`._ops.direct_ok`).

Shapes: ``x`` is ``[..., d]`` (leading dims are flattened to ``M`` rows by the kernels);
``d = in_features``. ``backend`` is ``"auto"`` or a name from ``backend_info()``.
"""

from __future__ import annotations

import math

from torch import Tensor

from . import _ops, _signature
from . import _validate as check
from ._op_names import OP_NAMES


def sparsity_to_k(d: int, sparsity: float) -> int:
    """Kept count for sparsity ``s`` in ``[0, 1)``: ``clamp(floor((1 - s) * d + 1e-6), 1, d)``.

    ``sparsity_to_k(10, 0.6) == 4``; ``sparsity_to_k(0, s) == 0``.
    """
    d = check.integer("sparsity_to_k", "d", d, 0)
    sparsity = check.sparsity("sparsity_to_k", sparsity)
    if d == 0:
        return 0
    return max(1, min(d, math.floor((1.0 - sparsity) * d + 1e-6)))


def topk_sparsify(x: Tensor, k: int, *, backend: str = "auto") -> Tensor:
    """Per row keep the ``k`` entries of largest ``|x|`` and set the rest to +0.

    x: ``[..., d]`` float32 / bfloat16 / float16; ``0 <= k <= d``. Returns the same shape and dtype.
    NaN counts as the largest magnitude; with ties exactly ``k`` entries are kept.
    Backward is straight-through (the gradient reaches every entry).
    """
    k = check.topk_sparsify(x, k)
    if _ops.direct_ok(x):
        return _ops.run("topk_sparsify", backend, x.device, x, k)
    return _ops.topk_sparsify(x, k, backend)


def block_topk_sparsify(x: Tensor, n: int, m: int, *, backend: str = "auto") -> Tensor:
    """Block Q-Sparse (N:M): in each contiguous block of ``m`` along the last dim keep the ``n`` largest ``|x|``.

    x: ``[..., d]`` float with ``d % m == 0``; ``0 <= n <= m``. Same shape and dtype out.
    """
    n, m = check.block_topk_sparsify(x, n, m)
    if _ops.direct_ok(x):
        return _ops.run("block_topk_sparsify", backend, x.device, x, n, m)
    return _ops.block_topk_sparsify(x, n, m, backend)


def sparse_linear(x: Tensor, weight: Tensor, k: int, bias: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """``F.linear(topk_sparsify(x, k), weight, bias)`` with float32 accumulation.

    x: ``[..., in]``; weight: ``[out, in]`` with any strides, same dtype as ``x`` (fastest when
    column-major, ``weight.stride(0) == 1``: see :func:`to_fast_layout`); bias: ``[out]`` or None.
    Returns ``[..., out]`` in ``x.dtype``. Backward: STE (SPEC "Autograd").
    """
    k = _signature.sparse_linear(x, weight, k, bias)
    if _ops.direct_ok(x, weight, bias):
        return _ops.run("sparse_linear", backend, x.device, x, weight, k, bias)
    return _ops.sparse_linear(x, weight, k, bias, backend)


def quantize_act_int8(x: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-row absmax int8 quantization (BitNet b1.58), bit-exact with the published quantizer.

    x: ``[..., d]`` float. Returns ``x_q`` int8 ``[..., d]`` and ``x_scale`` float32 ``[..., 1]``
    with ``x ~= x_q * x_scale``, where ``x_scale = clamp(max|x|, 1e-5) / 127``.
    """
    check.quantize_act_int8(x)
    if _ops.direct_ok(x):
        return _ops.run("quantize_act_int8", backend, x.device, x)
    return _ops.quantize_act_int8(x, backend)


def quantize_weight_ternary(weight: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization (BitNet b1.58), packed.

    weight: ``[out, in]`` float. Returns ``packed`` uint8 ``[in, ceil(out/4)]`` (SPEC 6) and
    ``scale`` float32 ``[]`` with ``weight ~= unpack_ternary(packed, out) * scale``.
    """
    check.quantize_weight_ternary(weight)
    return _ops.quantize_weight_ternary(weight, backend)


def pack_ternary(t: Tensor, *, backend: str = "auto") -> Tensor:
    """Pack ternary ``t`` (int8 ``[out, in]`` in {-1, 0, 1}) into uint8 ``[in, ceil(out/4)]`` (SPEC 6)."""
    check.pack_ternary(t)
    return _ops.pack_ternary(t, backend)


def unpack_ternary(packed: Tensor, out_features: int, *, backend: str = "auto") -> Tensor:
    """Unpack uint8 ``[in, ceil(out/4)]`` into int8 ``[out_features, in]``; rejects the invalid code 3."""
    out_features = check.unpack_ternary(packed, out_features)
    return _ops.unpack_ternary(packed, out_features, backend)


def ternary_linear(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    out_features: int,
    k: int | None = None,
    bias: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """BitNet b1.58 linear with optional Q-Sparse: W1.58 x A8 with exact int32 accumulation.

    x: ``[..., in]`` float; packed: uint8 ``[in, ceil(out/4)]``; scale: float32 scalar, finite,
    > 0; k: kept count (``None`` = dense activations); bias: ``[out]`` in ``x.dtype`` or None.
    Computes ``acc = quantize_act_int8(topk(x, k)).x_q @ t^T`` (int32) and returns
    ``acc * x_scale * scale (+ bias)`` as ``[..., out]`` in ``x.dtype``; NaN in rows whose kept
    entries hold NaN or +-Inf.
    """
    out_features, k = _signature.ternary_linear(x, packed, scale, out_features, k, bias)
    if _ops.direct_ok(x, packed, scale, bias):
        return _ops.run("ternary_linear", backend, x.device, x, packed, scale, out_features, k, bias)
    return _ops.ternary_linear(x, packed, scale, out_features, k, bias, backend)


def to_fast_layout(weight: Tensor) -> Tensor:
    """The same logical ``[out, in]`` weight stored column-major (``stride(0) == 1``), the fast layout
    of :func:`sparse_linear`: each input feature's ``out`` weights are one contiguous row.

    weight: ``[out, in]``, finite (a NaN / Inf raises ``ValueError``). Returns ``[out, in]``.
    """
    check.finite_weight("to_fast_layout", "weight", weight)
    return weight.t().contiguous().t()


__all__ = ["sparsity_to_k", *OP_NAMES, "to_fast_layout"]
