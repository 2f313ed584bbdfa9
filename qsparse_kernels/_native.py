"""Loads the compiled extension ``qsparse_kernels._C`` if it was built; never fails the import.

An invalid ``QSPARSE_CPU_ISA`` (not ``scalar``, ``avx2`` or ``avx512``) does not stop the import
either: the C++ side ignores it and uses the detected ISA; here that becomes a ``RuntimeWarning``
(once, at import) and :func:`isa_env_error` returns the message that ``backend_info()`` reports.
"""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (registers the native ops in the ``qsparse`` namespace)

    LOAD_ERROR: str | None = None
    from .backends import _native_fakes  # noqa: F401
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = (
        f"qsparse_kernels._C could not be imported ({exc}): the C++ kernels were not built, or were built "
        "against another torch; every op runs on the reference backend. Build them with `make build` in a "
        "checkout, or reinstall with `pip install --no-build-isolation .` against the installed torch"
    )


def loaded() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return _C is not None and bool(_C.built_with_cuda())


def isa_env_error() -> str:
    """Why ``QSPARSE_CPU_ISA`` was ignored, or ``""`` (unset, empty or valid; or ``_C`` not built)."""
    if _C is None or not hasattr(_C, "cpu_isa_env_error"):
        return ""
    return str(_C.cpu_isa_env_error())


if isa_env_error():
    warnings.warn(f"qsparse_kernels: {isa_env_error()}", RuntimeWarning, stacklevel=2)
