"""Wrappers over the device-dispatched native ops (``torch.ops.qsparse.*_kernel``).

The same op name has a CPU implementation (``csrc/cpu``) and a CUDA one (``csrc/cuda``); the
dispatcher picks by the tensor's device, so the ``cpu`` and ``cuda`` backends share these.
"""

from __future__ import annotations

import math

import torch


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` as a contiguous ``[M, d]`` matrix (a view when ``x`` is contiguous)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_q, x_scale = torch.ops.qsparse.quantize_act_int8_kernel(rows(x))
    return x_q.reshape(x.shape), x_scale.reshape(*x.shape[:-1], 1)
