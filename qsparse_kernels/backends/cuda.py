"""The ``cuda`` backend: C++/CUDA kernels in ``csrc/cuda``, registered for the CUDA dispatch key."""

from __future__ import annotations

import torch

from .. import _native
from . import _native_ops


def devices() -> tuple[str, ...]:
    return ("cuda",)


def status() -> tuple[bool, bool, str]:
    if not _native.loaded():
        return False, False, _native.LOAD_ERROR or "not built"
    if not _native.built_with_cuda():
        return False, False, "qsparse_kernels._C was built without CUDA (no nvcc or a CPU build of torch at build time)"
    archs = _native._C.cuda_archs()
    if not torch.cuda.is_available():
        return True, False, f"built for {archs}, but no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, True, f"built for {archs}; device {torch.cuda.get_device_name()}"


OPS = {"quantize_act_int8": _native_ops.quantize_act_int8}
