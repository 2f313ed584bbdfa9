"""Argument checks and small helpers shared by the modules (no math: the ops do that)."""

from __future__ import annotations

import functools

import torch

from .. import _validate as check
from ..backends import CHOICES
from ..ops import sparsity_to_k, to_fast_layout


def backend_name(owner: str, backend) -> str:
    """``backend`` if it is ``"auto"`` or a known backend name, else a ``ValueError`` naming ``owner``."""
    if not isinstance(backend, str) or backend not in CHOICES:
        raise ValueError(f"qsparse_kernels.{owner}: backend must be one of {CHOICES}, got {backend!r}")
    return backend


def sparsity_or_k(owner: str, in_features: int, sparsity, k, allow_dense: bool = False):
    """Checked ``(sparsity, k)``: ``k`` (kept count, ``0 <= k <= in_features``) overrides ``sparsity``.

    ``sparsity`` is a float in ``[0, 1)``; ``None`` is accepted only when ``allow_dense`` (no top-K).
    """
    check.integer(owner, "in_features", in_features, 0)
    if k is not None:
        check.integer(owner, "k", k, 0, in_features, "in_features")
        return None, int(k)
    if sparsity is None:
        if not allow_dense:
            raise ValueError(f"qsparse_kernels.{owner}: give sparsity (a float in [0, 1)) or k")
        return None, None
    check.sparsity(owner, sparsity)
    return float(sparsity), None


def block_nm(owner: str, block, in_features: int) -> tuple[int, int] | None:
    """Checked Block Q-Sparse ``(n, m)``: ``m >= 1``, ``0 <= n <= m`` and ``m`` divides ``in_features``."""
    if block is None:
        return None
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise ValueError(f"qsparse_kernels.{owner}: block must be a pair (n, m), got {block!r}")
    n, m = block
    check.integer(owner, "block m", m, 1)
    check.integer(owner, "block n", n, 0, m, "m")
    if in_features % m != 0:
        raise ValueError(f"qsparse_kernels.{owner}: block m = {m} must divide in_features = {in_features}")
    return int(n), int(m)


def kept(sparsity: float | None, k: int | None, d: int) -> int | None:
    """The kept count for an input of last dim ``d``: ``k`` if set, else ``sparsity_to_k(d, sparsity)``."""
    if k is not None:
        return k
    if sparsity is None:
        return None
    return _kept_for(d, sparsity) if type(d) is int else sparsity_to_k(d, sparsity)  # SymInts do not hash


@functools.lru_cache(maxsize=1024)
def _kept_for(d: int, sparsity: float) -> int:
    # Every forward needs it and a model has a handful of (d, sparsity) pairs: ~1.5 us saved per call.
    return sparsity_to_k(d, sparsity)


def relayout_(param: torch.Tensor) -> None:
    """Move a 2-D weight Parameter into the fast column-major layout in place (same Parameter object)."""
    if param.dim() == 2 and param.stride(0) != 1:
        with torch.no_grad():
            param.data = to_fast_layout(param.data)


# One C call (~0.1 us) that is False unless some autocast is on; the per-device query costs ~1.5 us.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def param(mod: torch.nn.Module, name: str):
    """``getattr(mod, name)`` for a Parameter (or None) registered under ``name``, without
    nn.Module.__getattr__'s ~0.8 us; anything else (a parametrized or pruned weight: a property or
    a plain attribute) through getattr."""
    params = mod._parameters
    return params[name] if name in params else getattr(mod, name)


def autocast_args(x: torch.Tensor, *tensors):
    """Under ``torch.autocast``, ``x`` and ``tensors`` (None allowed) cast to the autocast dtype, as
    ``nn.Linear`` would be (custom ops are not autocast by PyTorch); unchanged otherwise."""
    if not _any_autocast():
        return (x, *tensors)
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return (x, *tensors)
    dt = torch.get_autocast_dtype(dev)
    return tuple(None if t is None else t.to(dt) for t in (x, *tensors))
