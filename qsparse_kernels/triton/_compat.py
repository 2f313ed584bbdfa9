"""Version guards: the one place that knows which Triton / PyTorch features exist.

Supported: PyTorch 2.11-2.14, Triton 3.6-3.9, CUDA GPUs natively and CPU tensors under
``TRITON_INTERPRET=1`` (the Triton interpreter, used by the tests on machines without a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (``TRITON_INTERPRET=1``).

    Read when the kernels are defined (``triton.jit`` makes the same decision at decoration time).
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


INTERPRET = interpreting()

# torch.library.triton_op / wrap_triton (PyTorch >= 2.6): launchers registered this way are
# traced through by torch.compile (the Triton kernels become graph nodes inductor can schedule).
# Under the interpreter there is nothing for inductor to compile, so plain calls are used there.
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not INTERPRET


def wrap(kernel) -> Callable:
    """``kernel`` made traceable by torch.compile where PyTorch supports it; itself otherwise.

    Use as ``wrap(kernel)[grid](...)``. Outside tracing this is a plain launch.
    """
    return torch.library.wrap_triton(kernel) if HAS_TRITON_OP else kernel


def is_tracing(*tensors: torch.Tensor) -> bool:
    """True while torch.compile traces (fake tensors): no benchmarking, no data access then."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(t) for t in tensors)


def is_capturing() -> bool:
    """True while a CUDA graph is being captured (autotuning would break the capture)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# Tests set this to True so that every buffer the launchers allocate starts as garbage (NaN for
# floats, a recognisable pattern for integers): an element a kernel forgets to write shows up.
POISON_BUFFERS = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, or a poisoned buffer when :data:`POISON_BUFFERS` is set (tests only)."""
    if not POISON_BUFFERS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else 0x5A
    return torch.full(shape, fill, dtype=dtype, device=device)
