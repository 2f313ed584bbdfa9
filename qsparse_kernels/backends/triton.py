"""The ``triton`` backend: kernels in :mod:`qsparse_kernels.triton`.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the interpreter, for tests).
"""

from __future__ import annotations

import os

import torch


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if _interpret() else ("cuda",)


def status() -> tuple[bool, bool, str]:
    try:
        import triton
    except ImportError as exc:
        return False, False, f"triton is not installed ({exc})"
    if _interpret():
        return True, True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU tensors, slow)"
    if not torch.cuda.is_available():
        why = "no CUDA device is visible and TRITON_INTERPRET is not 1"
        return True, False, f"triton {triton.__version__} installed, but {why}"
    return True, True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def _ops() -> dict:
    if not status()[1]:
        return {}
    from ..triton import OPS

    return OPS


OPS = _ops()
