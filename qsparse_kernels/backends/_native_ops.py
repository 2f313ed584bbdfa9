"""Wrappers over the device-dispatched native ops (``torch.ops.qsparse.*_kernel``).

The same op name has a CPU implementation (``csrc/cpu``) and a CUDA one (``csrc/cuda``); the
dispatcher picks by the tensor's device, so the ``cpu`` and ``cuda`` backends share these. Each has
the reference signature; the kernels take ``x`` as a contiguous ``[M, d]`` matrix.
"""

from __future__ import annotations

import math

import torch


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` as a contiguous ``[M, d]`` matrix (``x`` itself or a view when possible)."""
    if x.is_contiguous():
        return x if x.dim() == 2 else x.view(math.prod(x.shape[:-1]), x.shape[-1])
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def unrows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A kernel's ``[M, n]`` result back to ``x``'s leading dims: ``[..., n]``."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_q, x_scale = torch.ops.qsparse.quantize_act_int8_kernel(rows(x))
    return unrows(x_q, x), unrows(x_scale, x)


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    return unrows(torch.ops.qsparse.topk_sparsify_kernel(rows(x), k), x)


def block_topk_sparsify(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return unrows(torch.ops.qsparse.block_topk_sparsify_kernel(rows(x), n, m), x)

