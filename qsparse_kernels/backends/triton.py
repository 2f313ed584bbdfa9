"""The ``triton`` backend: kernels in :mod:`qsparse_kernels.triton`.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the interpreter, for tests).
"""

from __future__ import annotations

import os
import re

import torch


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if _interpret() else ("cuda",)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:2])


def _interpreter_numpy_problem(triton_version: str) -> str | None:
    """Why the interpreter cannot run here, or None. Triton's interpreter before 3.8 turns a scalar
    (a 1-element array) into a Python int with ``int(array)``, which numpy >= 2.4 rejects ("only
    0-dimensional arrays can be converted"): every kernel with a run-time loop bound fails. Compiled
    kernels on a GPU are not affected."""
    import numpy

    if _version(triton_version) < (3, 8) and _version(numpy.__version__) >= (2, 4):
        return (f"triton {triton_version}'s interpreter (TRITON_INTERPRET=1) needs numpy < 2.4, found numpy "
                f"{numpy.__version__}: install numpy<2.4 or triton>=3.8 (GPU runs are not affected)")
    return None


def status() -> tuple[bool, bool, str]:
    try:
        import triton
    except ImportError as exc:
        return False, False, f"triton is not installed ({exc})"
    if _interpret():
        broken = _interpreter_numpy_problem(triton.__version__)
        if broken:
            return True, False, broken
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
