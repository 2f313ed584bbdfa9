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


# Zero-filled buffers that the fused GEMVs return to zero themselves (split-K arrival counters,
# int32 accumulators): allocated (one fill) the first time a device needs that many elements, then
# reused by every call without a fill, so a call is one launch. Calls on one stream are ordered;
# two calls running at once on different streams must not share them (not supported).
_ZEROED: dict[tuple, torch.Tensor] = {}


def zeroed(name: str, numel: int, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A zero-filled ``[>= numel]`` buffer of ``dtype`` on ``like``'s device, kept per
    ``(name, device)``; whoever uses it leaves it zero again.

    While torch.compile traces (``like`` is a fake tensor) a fresh ``torch.zeros`` is returned and
    nothing is kept: a kept real buffer would be a constant that fake tracing rejects, and a fake
    one kept would reach later eager calls."""
    device = like.device
    if is_tracing(like):
        return torch.zeros(numel, dtype=dtype, device=device)
    key = (name, torch.device(device), dtype)
    buf = _ZEROED.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(max(numel, 1024), dtype=dtype, device=device)
        _ZEROED[key] = buf
    return buf


def _fast_interpreter_calls() -> None:
    """Under ``TRITON_INTERPRET=1``: a ``@triton.jit`` helper called from a running kernel no longer
    re-patches ``triton.language`` (Triton's interpreter does it on every device-function call,
    ~10 ms each, which made the fused GEMVs' prologues take seconds per program). The kernel's own
    patch is already in force and covers the same modules, so the helper's patch is skipped; the
    kernel's patch is restored at its end as before. Private API: skipped if it is not there."""
    import inspect

    import triton.language as tl

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    orig = getattr(interpreter, "_patch_lang", None)
    if orig is None or getattr(orig, "_qsparse", False):
        return
    active: list[set] = []  # the lang modules patched by the running kernel (one entry while it runs)
    nested: list = []  # patches a helper added for modules the kernel's patch did not cover

    class _Nothing:
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if active:
            if not langs <= active[0]:
                nested.append(orig(fn))
                active[0] |= langs
            return _Nothing()
        scope = orig(fn)
        active.append(langs)
        restore = scope.restore

        def restore_all():
            while nested:
                nested.pop().restore()
            active.clear()
            restore()

        scope.restore = restore_all
        return scope

    patch_lang._qsparse = True
    interpreter._patch_lang = patch_lang


if INTERPRET:
    _fast_interpreter_calls()
