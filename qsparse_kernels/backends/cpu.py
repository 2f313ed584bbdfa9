"""The ``cpu`` backend: C++ kernels in ``csrc/cpu`` (OpenMP, ISA picked at run time)."""

from __future__ import annotations

import torch

from .. import _native
from . import _native_ops as native


def devices() -> tuple[str, ...]:
    return ("cpu",)


def status() -> tuple[bool, bool, str]:
    if not _native.loaded():
        return False, False, _native.LOAD_ERROR or "not built"
    return True, True, f"C++ CPU kernels, ISA {_native._C.cpu_isa()}, {torch.get_num_threads()} threads"


OPS = {
    "quantize_act_int8": native.quantize_act_int8,
    "topk_sparsify": native.topk_sparsify,
    "block_topk_sparsify": native.block_topk_sparsify,
    "sparse_linear": native.sparse_linear,
    "ternary_linear": native.ternary_linear,
}
