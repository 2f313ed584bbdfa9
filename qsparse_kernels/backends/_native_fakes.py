"""Fake (meta) implementations of the native kernel ops, for opcheck and ``torch.compile``.

Imported by :mod:`qsparse_kernels._native` only when ``_C`` loaded (the ops exist only then).
One function per op declared in ``csrc/registration.cpp``.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("qsparse::quantize_act_int8_kernel")
def _quantize_act_int8_kernel(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.register_fake("qsparse::topk_sparsify_kernel")
def _topk_sparsify_kernel(x, k):
    return torch.empty_like(x)


@torch.library.register_fake("qsparse::block_topk_sparsify_kernel")
def _block_topk_sparsify_kernel(x, n, m):
    return torch.empty_like(x)


@torch.library.register_fake("qsparse::sparse_linear_kernel")
def _sparse_linear_kernel(x, weight, k, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("qsparse::ternary_linear_kernel")
def _ternary_linear_kernel(x, packed, scale, out_features, k, bias):
    return x.new_empty((*x.shape[:-1], out_features))
