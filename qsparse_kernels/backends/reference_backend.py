"""The ``reference`` backend: :mod:`qsparse_kernels.reference` on every device."""

from __future__ import annotations

from .. import reference
from .._op_names import OP_NAMES

OPS = {name: getattr(reference, name) for name in OP_NAMES}


def devices() -> tuple[str, ...]:
    return ("cpu", "cuda", "meta", "xpu", "mps")


def status() -> tuple[bool, bool, str]:
    return True, True, "pure PyTorch, always available"
