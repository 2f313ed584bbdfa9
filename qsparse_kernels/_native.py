"""Loads the compiled extension ``qsparse_kernels._C`` if it was built; never fails the import."""

from __future__ import annotations

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
