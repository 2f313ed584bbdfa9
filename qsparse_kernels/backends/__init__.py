"""Backend registry: which implementation of an op runs, and why.

Backends: ``reference`` (pure PyTorch, every device), ``cpu`` (C++ kernels), ``triton`` (GPU, or CPU
under ``TRITON_INTERPRET=1``), ``cuda`` (C++/CUDA kernels). Each lives in a module of this package
that exposes ``DEVICES`` (device types it runs on), ``OPS`` (op name -> function with the
reference signature) and ``status() -> (built, usable, reason)``.

Precedence (SPEC "Backends"): an explicit backend argument other than ``"auto"`` > the innermost
:func:`use_backend` context > the ``QSPARSE_BACKEND`` environment variable > ``"auto"``.
``"auto"`` picks, per op and device, the first usable backend in :data:`AUTO_ORDER` that
implements the op natively. An explicitly chosen backend that is usable but has no kernel for
an op runs the reference for that op (``backend_info()[name]["ops"]`` lists its own kernels);
an explicitly chosen backend that is not usable is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
CHOICES = ("auto", *BACKENDS)
ENV_VAR = "QSPARSE_BACKEND"
# Fastest first; "reference" always closes the list. A later issue orders by measured shape.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("qsparse_backend", default=None)

# os.environ.get encodes the key and decodes the value on every call (~1.3 us, a tenth of a decode
# step's op wrapper); os.environ's own backing dict of encoded keys answers the same in ~0.1 us and
# sees every change made through os.environ (monkeypatch.setenv, mock.patch.dict too).
_ENVIRON = os.environ
_ENV_DATA = getattr(_ENVIRON, "_data", None)
_ENV_KEY = _ENVIRON.encodekey(ENV_VAR) if _ENV_DATA is not None and hasattr(_ENVIRON, "encodekey") else None


def _env_backend() -> str | None:
    """``os.environ.get(ENV_VAR)``, fast."""
    if _ENV_KEY is None or os.environ is not _ENVIRON:
        return os.environ.get(ENV_VAR)
    v = _ENV_DATA.get(_ENV_KEY)
    return None if v is None else _ENVIRON.decodevalue(v)


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"qsparse_kernels: {where} must be one of {CHOICES}, got {name!r}")
    return name


@functools.cache
def _module(name: str):
    return importlib.import_module(f"{__name__}.{'reference_backend' if name == 'reference' else name}")


@functools.cache
def status(name: str) -> tuple[bool, bool, str]:
    """``(built, usable, reason)`` of one backend, computed once per process."""
    return _module(name).status()


def devices(name: str) -> tuple[str, ...]:
    return tuple(_module(name).devices())


def ops(name: str) -> dict[str, Callable]:
    return _module(name).OPS


def backend_info() -> dict[str, dict]:
    """Every backend: ``{"built": bool, "usable": bool, "reason": str, "ops": [its own kernels]}``."""
    info = {}
    for name in BACKENDS:
        built, usable, reason = status(name)
        info[name] = {"built": built, "usable": usable, "reason": reason, "ops": sorted(ops(name)) if usable else []}
    return info


def _require_usable(name: str) -> None:
    built, usable, reason = status(name)
    if not usable:
        raise RuntimeError(f"qsparse_kernels: backend {name!r} is not usable here: {reason}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (or ``"auto"``).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` for a backend that is not
    usable here. Nests; the innermost context wins; explicit per-call/per-module backends win
    over it. Context-local (threads and asyncio tasks each see their own).
    """
    _check_name(name, "use_backend(name)")
    if name != "auto":
        _require_usable(name)
    token = _context.set(name)
    try:
        yield
    finally:
        _context.reset(token)


def requested(explicit: str = "auto") -> str:
    """The backend name in force for a call whose own argument is ``explicit``."""
    if explicit != "auto":
        return _check_name(explicit, "backend")
    ctx = _context.get()
    if ctx is not None:
        return ctx
    env = _env_backend()
    if env:
        return _check_name(env, f"the environment variable {ENV_VAR}")
    return "auto"


def select(op: str, explicit: str, device: torch.device) -> tuple[str, Callable]:
    """``(backend name, implementation)`` of ``op`` for a tensor on ``device``."""
    name, table = _pick(op, requested(explicit), device.type)
    return name, table[op]


@functools.cache
def _pick(op: str, name: str, device_type: str) -> tuple[str, dict[str, Callable]]:
    resolved = _resolve(op, name, device_type)
    return resolved, ops(resolved)


@functools.cache
def _resolve(op: str, name: str, device_type: str) -> str:
    """The backend that runs ``op``; backend status is fixed per process, so this is cached."""
    if name == "auto":
        for cand in AUTO_ORDER.get(device_type, ("reference",)):
            if op in ops(cand) and status(cand)[1] and device_type in devices(cand):
                return cand
        return "reference"
    _require_usable(name)
    if device_type not in devices(name):
        raise RuntimeError(
            f"qsparse_kernels: backend {name!r} runs on {devices(name)} tensors, got a tensor on {device_type}"
        )
    return name if op in ops(name) else "reference"
