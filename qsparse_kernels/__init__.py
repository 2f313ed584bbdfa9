"""qsparse_kernels: fast kernels for Q-Sparse (top-K activation sparsity) and BitNet b1.58 layers.

Public ops (SPEC.md): :func:`sparsity_to_k`, :func:`topk_sparsify`, :func:`block_topk_sparsify`,
:func:`sparse_linear`, :func:`quantize_act_int8`, :func:`quantize_weight_ternary`,
:func:`pack_ternary`, :func:`unpack_ternary`, :func:`ternary_linear`. Backends:
:func:`backend_info`, :func:`use_backend`, environment variable ``QSPARSE_BACKEND``.
"""

from __future__ import annotations

from . import (
    _native,  # noqa: F401  (loads the C++ extension when it was built)
    _ops,  # noqa: F401  (registers the custom ops)
    nn,
    scaling,
)
from .backends import backend_info, use_backend
from .checkpoint import load_checkpoint, save_checkpoint
from .convert import QSparseConfig, convert
from .ops import (
    block_topk_sparsify,
    pack_ternary,
    quantize_act_int8,
    quantize_weight_ternary,
    sparse_linear,
    sparsity_to_k,
    ternary_linear,
    to_fast_layout,
    topk_sparsify,
    unpack_ternary,
)

__version__ = "0.1.0"

__all__ = [
    "backend_info",
    "use_backend",
    "sparsity_to_k",
    "topk_sparsify",
    "block_topk_sparsify",
    "sparse_linear",
    "quantize_act_int8",
    "quantize_weight_ternary",
    "pack_ternary",
    "unpack_ternary",
    "ternary_linear",
    "to_fast_layout",
    "nn",
    "scaling",
    "convert",
    "QSparseConfig",
    "save_checkpoint",
    "load_checkpoint",
    "__version__",
]
