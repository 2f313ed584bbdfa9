"""Fake (meta) implementations of the native kernel ops, for opcheck and ``torch.compile``.

Imported by :mod:`qsparse_kernels._native` only when ``_C`` loaded (the ops exist only then).
One function per op declared in ``csrc/registration.cpp``.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("qsparse::quantize_act_int8_kernel")
def _quantize_act_int8_kernel(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)
