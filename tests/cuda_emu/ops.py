"""The emulated CUDA kernels behind the public ops' signatures, on CPU tensors.

Each function takes what ``qsparse_kernels.<op>`` takes, flattens ``x [..., d]`` to the contiguous
[M, d] rows the cuda backend passes its kernels (``qsparse_kernels/backends/cuda.py``) and calls
``torch.ops.qsparse_cuda_emu.<op>_kernel`` always, also above the backend's dense crossover: the
point is to run the kernel. The property tests (tests/test_fuzz.py) use these as the backend
"cuda-emulated".
"""

from __future__ import annotations

import torch

from qsparse_kernels.backends import _native_fakes

from .build import load

_registered = False


def library():
    """``torch.ops.qsparse_cuda_emu`` (built on first use), with the fakes opcheck needs."""
    global _registered
    load()
    if not _registered:
        _native_fakes.register("qsparse_cuda_emu")
        _registered = True
    return torch.ops.qsparse_cuda_emu


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1) if x.dim() == 1 else x.flatten(0, -2).contiguous()


def _unrows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_act_int8(x):
    q, s = library().quantize_act_int8_kernel(_rows(x))
    return _unrows(q, x), _unrows(s, x)


def topk_sparsify(x, k):
    return _unrows(library().topk_sparsify_kernel(_rows(x), k), x)


def block_topk_sparsify(x, n, m):
    return _unrows(library().block_topk_sparsify_kernel(_rows(x), n, m), x)


def sparse_linear(x, weight, k, bias=None):
    return _unrows(library().sparse_linear_kernel(_rows(x), weight, k, bias), x)


def ternary_linear(x, packed, scale, out_features, k=None, bias=None):
    b = None if bias is None else bias.contiguous()
    y = library().ternary_linear_kernel(_rows(x), packed.contiguous(), scale, out_features, k, b)
    return _unrows(y, x)
