"""Triton kernels and their launchers (backend ``triton``). ``OPS`` maps op name -> launcher.

Files: :mod:`.select` (per-row radix top-k: ``topk_sparsify`` and the kept lists),
:mod:`.quantize` (``quantize_act_int8`` and the bit-exact rounding helpers), :mod:`.sparse_gemv`
(``sparse_linear``), :mod:`.ternary_gemv` (``ternary_linear``), :mod:`.cast` (round-to-nearest-even
stores), :mod:`.autotune` (configs and their per-shape cache), :mod:`._compat` (version guards,
test hooks).

Every launcher has the reference signature (without ``backend``) and expects arguments already
checked by ``qsparse_kernels._validate``. None of them reads tensor data on the host, so a decode
step can be captured in a CUDA graph (after one warm-up call per shape fills the autotune cache).

Where PyTorch has ``torch.library.triton_op`` (>= 2.6) the launchers are registered as
``qsparse_triton::<op>`` with their kernels wrapped by ``wrap_triton``, so torch.compile can
trace through them when they are called directly; the public ``qsparse::`` custom ops stay opaque
to the compiler either way. Under ``TRITON_INTERPRET=1`` the plain launchers are used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._compat import HAS_TRITON_OP
from .quantize import quantize_act_int8
from .select import topk_sparsify
from .sparse_gemv import sparse_linear
from .ternary_gemv import ternary_linear

NS = "qsparse_triton"


def _register() -> dict[str, Callable]:
    if not HAS_TRITON_OP:
        return {
            "topk_sparsify": topk_sparsify,
            "sparse_linear": sparse_linear,
            "quantize_act_int8": quantize_act_int8,
            "ternary_linear": ternary_linear,
        }
    triton_op = torch.library.triton_op

    @triton_op(f"{NS}::topk_sparsify", mutates_args=())
    def _topk(x: Tensor, k: int) -> Tensor:
        return topk_sparsify(x, k)

    @triton_op(f"{NS}::sparse_linear", mutates_args=())
    def _sparse(x: Tensor, weight: Tensor, k: int, bias: Tensor | None) -> Tensor:
        return sparse_linear(x, weight, k, bias)

    @triton_op(f"{NS}::quantize_act_int8", mutates_args=())
    def _quant(x: Tensor) -> tuple[Tensor, Tensor]:
        return quantize_act_int8(x)

    @triton_op(f"{NS}::ternary_linear", mutates_args=())
    def _ternary(
        x: Tensor, packed: Tensor, scale: Tensor, out_features: int, k: int | None, bias: Tensor | None
    ) -> Tensor:
        return ternary_linear(x, packed, scale, out_features, k, bias)

    ops = torch.ops.qsparse_triton
    return {
        "topk_sparsify": ops.topk_sparsify,
        "sparse_linear": lambda x, weight, k, bias=None: ops.sparse_linear(x, weight, k, bias),
        "quantize_act_int8": ops.quantize_act_int8,
        "ternary_linear": lambda x, packed, scale, out_features, k=None, bias=None: ops.ternary_linear(
            x, packed, scale, out_features, k, bias
        ),
    }


OPS: dict[str, Callable] = _register()
