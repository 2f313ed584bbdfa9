"""The ``cpu`` backend: C++ kernels in ``csrc/cpu`` (OpenMP, ISA picked at run time)."""

from __future__ import annotations

import torch

from .. import _native
from . import _native_ops


def devices() -> tuple[str, ...]:
    return ("cpu",)


def status() -> tuple[bool, bool, str]:
    if not _native.loaded():
        return False, False, _native.LOAD_ERROR or "not built"
    return True, True, f"C++ CPU kernels, ISA {_native._C.cpu_isa()}, {torch.get_num_threads()} threads"


OPS = {"quantize_act_int8": _native_ops.quantize_act_int8}
