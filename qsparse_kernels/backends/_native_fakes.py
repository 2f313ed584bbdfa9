"""Fake (meta) implementations of the native kernel ops, for opcheck and ``torch.compile``.

Imported by :mod:`qsparse_kernels._native` only when ``_C`` loaded (the ops exist only then).
One function per op declared in ``csrc/include/qsk/schemas.h``; :func:`register` also serves the
tests' emulated CUDA kernels, which declare the same schemas in another library.
"""

from __future__ import annotations

import torch


def _quantize_act_int8_kernel(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def _topk_sparsify_kernel(x, k):
    return torch.empty_like(x)


def _block_topk_sparsify_kernel(x, n, m):
    return torch.empty_like(x)


def _sparse_linear_kernel(x, weight, k, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _ternary_linear_kernel(x, packed, scale, out_features, k, bias):
    return x.new_empty((*x.shape[:-1], out_features))


def _sparse_linear_multi_kernel(x, weights, k, biases):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _ternary_linear_multi_kernel(x, packed, scales, out_features, k, biases):
    return [x.new_empty((*x.shape[:-1], n)) for n in out_features]


def _rms_norm_kernel(x, weight, eps):
    return x.new_empty(x.shape)


def _attention_kernel(q, k, v, mask, scale, is_causal):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


FAKES = {
    "quantize_act_int8_kernel": _quantize_act_int8_kernel,
    "topk_sparsify_kernel": _topk_sparsify_kernel,
    "block_topk_sparsify_kernel": _block_topk_sparsify_kernel,
    "sparse_linear_kernel": _sparse_linear_kernel,
    "ternary_linear_kernel": _ternary_linear_kernel,
    "sparse_linear_multi_kernel": _sparse_linear_multi_kernel,
    "ternary_linear_multi_kernel": _ternary_linear_multi_kernel,
    "rms_norm_kernel": _rms_norm_kernel,
    "attention_kernel": _attention_kernel,
}


def register(library: str) -> None:
    """Registers the fakes for ``library::<op>`` (``qsparse``, or a library with the same schemas)."""
    for name, fn in FAKES.items():
        torch.library.register_fake(f"{library}::{name}", fn)


register("qsparse")
