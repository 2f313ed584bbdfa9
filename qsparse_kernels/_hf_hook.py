"""Registers the ``qsparse_kernels`` quantization method with Hugging Face transformers, lazily.

``import qsparse_kernels`` must stay fast and must work without transformers, so it does not
import transformers (about 3 s). Instead :func:`install` registers right away when
``transformers.quantizers.auto`` (where the registries live) is already imported, and otherwise
puts a finder on ``sys.meta_path`` that waits for that module: once Python has executed it, the
registration runs (:func:`qsparse_kernels.hf_quantizer.register`) and the finder removes itself.
Nothing of transformers is patched; a failure to register warns and never breaks the import.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from . import hf_quantizer

        hf_quantizer.register()
    except Exception as exc:  # a transformers we do not support must not break its own import
        warnings.warn(
            f"qsparse_kernels: could not register the 'qsparse_kernels' quantization method with "
            f"transformers ({type(exc).__name__}: {exc}); from_pretrained of converted models will not work",
            RuntimeWarning,
            stacklevel=2,
        )


class _LoaderThenRegister(importlib.abc.Loader):
    """Runs the real loader, then registers; everything else is the real loader's."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _WaitForTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # once
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderThenRegister(spec.loader)
                return spec
        return None


def is_hf_model(model) -> bool:
    """True for a transformers ``PreTrainedModel``; never imports transformers."""
    mu = sys.modules.get("transformers.modeling_utils")
    return mu is not None and isinstance(model, mu.PreTrainedModel)


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it gets imported."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _WaitForTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _WaitForTransformers())
