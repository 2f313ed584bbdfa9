"""The emulated CUDA kernels behind the public ops' signatures, on CPU tensors.

Each function takes what ``qsparse_kernels.<op>`` takes, flattens ``x [..., d]`` to the contiguous
[M, d] rows the cuda backend passes its kernels (the same ``rows`` / ``unrows`` helpers) and calls
``torch.ops.qsparse_cuda_emu.<op>_kernel`` always, also above the backend's dense crossover: the
point is to run the kernel. The property tests (tests/test_fuzz.py) use these as the backend
"cuda-emulated".
"""

from __future__ import annotations

import functools

import torch

from qsparse_kernels.backends import _native_fakes
from qsparse_kernels.backends._native_ops import rows, unrows

from .build import load


@functools.cache
def library():
    """``torch.ops.qsparse_cuda_emu`` (built on first use), with the fakes opcheck needs."""
    load()
    _native_fakes.register("qsparse_cuda_emu")
    return torch.ops.qsparse_cuda_emu


def quantize_act_int8(x):
    q, s = library().quantize_act_int8_kernel(rows(x))
    return unrows(q, x), unrows(s, x)


def topk_sparsify(x, k):
    return unrows(library().topk_sparsify_kernel(rows(x), k), x)


def block_topk_sparsify(x, n, m):
    return unrows(library().block_topk_sparsify_kernel(rows(x), n, m), x)


def sparse_linear(x, weight, k, bias=None):
    return unrows(library().sparse_linear_kernel(rows(x), weight, k, bias), x)


def ternary_linear(x, packed, scale, out_features, k=None, bias=None):
    b = None if bias is None else bias.contiguous()
    y = library().ternary_linear_kernel(rows(x), packed.contiguous(), scale, out_features, k, b)
    return unrows(y, x)
