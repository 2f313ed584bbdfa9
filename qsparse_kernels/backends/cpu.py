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
    reason = f"C++ CPU kernels, ISA {_native._C.cpu_isa()}, {torch.get_num_threads()} threads"
    env_error = _native.isa_env_error()
    return True, True, f"{reason} (warning: {env_error})" if env_error else reason


def _linear_ops() -> dict:
    # The linear kernels take the reference signature's arguments as they are (x [..., d], any
    # strides: csrc/include/qsk/schemas.h), so the kernel ops are the implementations: no Python
    # wrapper on the per-layer hot path. They are called through _C's typed bindings of the same
    # operators (csrc/kernel_calls.cpp): the same dispatch, without torch.ops' ~3 us of argument
    # parsing per call.
    if not _native.loaded():
        return {}
    return {"sparse_linear": _native._C.call_sparse_linear, "ternary_linear": _native._C.call_ternary_linear}


OPS = {
    "quantize_act_int8": native.quantize_act_int8,
    "topk_sparsify": native.topk_sparsify,
    "block_topk_sparsify": native.block_topk_sparsify,
    **_linear_ops(),
}


def _multi_ops() -> dict:
    # Sibling projections (qsparse_kernels.sibling_ops): one top-K for several weights.
    if not _native.loaded():
        return {}
    return {
        "sparse_linear_multi": _native._C.call_sparse_linear_multi,
        "ternary_linear_multi": _native._C.call_ternary_linear_multi,
    }


MULTI_OPS = _multi_ops()
