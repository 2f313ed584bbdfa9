"""qsparse_kernels: fast kernels for Q-Sparse (top-K activation sparsity) and BitNet b1.58 layers.

Public ops (the contract: docs/SPEC.md): :func:`sparsity_to_k`, :func:`topk_sparsify`, :func:`block_topk_sparsify`,
:func:`sparse_linear`, :func:`quantize_act_int8`, :func:`quantize_weight_ternary`,
:func:`pack_ternary`, :func:`unpack_ternary`, :func:`ternary_linear`. Backends:
:func:`backend_info`, :func:`use_backend`, environment variable ``QSPARSE_BACKEND``.
"""

from __future__ import annotations

from . import (
    _hf_hook,
    _native,  # noqa: F401  (loads the C++ extension when it was built)
    _ops,  # noqa: F401  (registers the custom ops)
    attention,
    nn,
    ops,
    scaling,
)
from .backends import backend_info, use_backend
from .checkpoint import load_checkpoint, save_checkpoint
from .convert import QSparseConfig, convert, unconvert
from .convert_report import ConversionReport
from .ops import *  # noqa: F403  (the public ops, ops.__all__)

_hf_hook.install()  # registers the "qsparse_kernels" quantization method with transformers, lazily

__version__ = "0.1.0"

__all__ = [
    "backend_info",
    "use_backend",
    *ops.__all__,
    "nn",
    "attention",
    "scaling",
    "convert",
    "unconvert",
    "QSparseConfig",
    "ConversionReport",
    "save_checkpoint",
    "load_checkpoint",
    "__version__",
]
