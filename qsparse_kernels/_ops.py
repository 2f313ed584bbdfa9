"""The op contract: every public op registered once as a ``torch.library`` custom op.

Each op takes the SPEC arguments plus ``backend`` (a name or ``"auto"``) and runs the
implementation that :func:`.backends.select` picks at call time, so ``use_backend`` also switches
compiled graphs. Arguments are checked (:mod:`._validate`) by the public wrappers in
:mod:`.ops` and by the fakes (so ``torch.compile`` reports the same errors at trace time);
the native kernels re-check what they rely on with TORCH_CHECK.
Autograd follows SPEC "Autograd": straight-through for top-K.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op
from torch.utils._python_dispatch import _get_current_dispatch_mode as _get_dispatch_mode

from . import _validate as check
from .backends import select
from .layout import packed_shape

NS = "qsparse"
_Parameter = torch.nn.Parameter  # a module's weight: a plain tensor for dispatch
_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: False)


def _run(op: str, backend: str, device: torch.device, *args):
    return select(op, backend, device)[1](*args)


def direct_ok(*tensors: Tensor | None) -> bool:
    """True for an eager call on plain tensors that needs no autograd and no mode: there the
    registered op would only add dispatcher overhead (~6 us), so :mod:`.ops` calls the selected
    implementation directly (:func:`run`). Compiled graphs, tensor subclasses (fake, functional),
    active dispatch / function modes and autograd always go through the registered op."""
    if torch.compiler.is_compiling() or _get_dispatch_mode() is not None or _function_mode_on():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and ((type(t) is not Tensor and type(t) is not _Parameter) or (grad and t.requires_grad)):
            return False
    return True


run = _run


# ---- topk_sparsify ----
@custom_op(f"{NS}::topk_sparsify", mutates_args=())
def topk_sparsify(x: Tensor, k: int, backend: str) -> Tensor:
    return _run("topk_sparsify", backend, x.device, x, k)


@topk_sparsify.register_fake
def _(x, k, backend):
    check.topk_sparsify(x, k)
    return torch.empty_like(x)


def _straight_through(ctx, grad):
    return grad, None, None


topk_sparsify.register_autograd(_straight_through)


# ---- block_topk_sparsify ----
@custom_op(f"{NS}::block_topk_sparsify", mutates_args=())
def block_topk_sparsify(x: Tensor, n: int, m: int, backend: str) -> Tensor:
    return _run("block_topk_sparsify", backend, x.device, x, n, m)


@block_topk_sparsify.register_fake
def _(x, n, m, backend):
    check.block_topk_sparsify(x, n, m)
    return torch.empty_like(x)


block_topk_sparsify.register_autograd(lambda ctx, grad: (grad, None, None, None))


# ---- sparse_linear ----
@custom_op(f"{NS}::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, weight: Tensor, k: int, bias: Tensor | None, backend: str) -> Tensor:
    return _run("sparse_linear", backend, x.device, x, weight, k, bias)


@sparse_linear.register_fake
def _(x, weight, k, bias, backend):
    check.sparse_linear(x, weight, k, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _sparse_linear_setup(ctx, inputs, output):
    x, weight, k, bias, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.k, ctx.backend, ctx.has_bias = k, backend, bias is not None


def _sparse_linear_backward(ctx, g):
    # STE (paper Eq. 13): dx = g @ W for every entry of x; dW = g^T @ topk(x); db = sum(g).
    x, weight = ctx.saved_tensors
    dx = dw = db = None
    g2 = g.reshape(-1, g.shape[-1])
    if ctx.needs_input_grad[0]:
        dx = g.matmul(weight)
    if ctx.needs_input_grad[1]:
        xs = topk_sparsify(x, ctx.k, ctx.backend).reshape(-1, x.shape[-1])
        # dW in the weight's own layout: a column-major weight (the fast layout) gets (xs^T g)^T,
        # so that AccumulateGrad neither copies it into the parameter's strides nor adds across
        # transposed strides (that add was 2/3 of a bf16 training step on the CPU).
        dw = xs.t().matmul(g2).t() if weight.stride(0) == 1 and weight.shape[0] > 1 else g2.t().matmul(xs)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = g2.sum(0)
    return dx, dw, None, db, None


sparse_linear.register_autograd(_sparse_linear_backward, setup_context=_sparse_linear_setup)


# ---- quantize_act_int8 ----
@custom_op(f"{NS}::quantize_act_int8", mutates_args=())
def quantize_act_int8(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return _run("quantize_act_int8", backend, x.device, x)


@quantize_act_int8.register_fake
def _(x, backend):
    check.quantize_act_int8(x)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# ---- quantize_weight_ternary ----
@custom_op(f"{NS}::quantize_weight_ternary", mutates_args=())
def quantize_weight_ternary(weight: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return _run("quantize_weight_ternary", backend, weight.device, weight)


@quantize_weight_ternary.register_fake
def _(weight, backend):
    check.quantize_weight_ternary(weight)
    out_f, in_f = weight.shape
    return weight.new_empty(packed_shape(in_f, out_f), dtype=torch.uint8), weight.new_empty((), dtype=torch.float32)


# ---- pack_ternary / unpack_ternary ----
@custom_op(f"{NS}::pack_ternary", mutates_args=())
def pack_ternary(t: Tensor, backend: str) -> Tensor:
    return _run("pack_ternary", backend, t.device, t)


@pack_ternary.register_fake
def _(t, backend):
    check.pack_ternary(t)
    return t.new_empty(packed_shape(t.shape[1], t.shape[0]), dtype=torch.uint8)


@custom_op(f"{NS}::unpack_ternary", mutates_args=())
def unpack_ternary(packed: Tensor, out_features: int, backend: str) -> Tensor:
    return _run("unpack_ternary", backend, packed.device, packed, out_features)


@unpack_ternary.register_fake
def _(packed, out_features, backend):
    check.unpack_ternary(packed, out_features)
    return packed.new_empty((out_features, packed.shape[0]), dtype=torch.int8)


# ---- ternary_linear ----
@custom_op(f"{NS}::ternary_linear", mutates_args=())
def ternary_linear(
    x: Tensor, packed: Tensor, scale: Tensor, out_features: int, k: int | None, bias: Tensor | None, backend: str
) -> Tensor:
    return _run("ternary_linear", backend, x.device, x, packed, scale, out_features, k, bias)


@ternary_linear.register_fake
def _(x, packed, scale, out_features, k, bias, backend):
    check.ternary_linear(x, packed, scale, out_features, k, bias)
    return x.new_empty((*x.shape[:-1], out_features))
