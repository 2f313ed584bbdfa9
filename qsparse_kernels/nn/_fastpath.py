"""A converted layer's per-call fast path: its last call's checks, remembered (issue 16).

A decode step calls each converted layer once per token with the same kind of input: the same
dtype, device and last dim, the same weights, no autograd, no mode. Everything
``qsparse_kernels.ops`` checks and resolves for such a call (argument checks, the scale's value,
the backend's implementation) gives the same answer as last time, yet costs ~5 us of Python per
call, and inside a model, where the weights stream through the caches between calls, about twice
that (~1.8 ms of a 20 ms BitNet + Q-Sparse token).

So after a call that went the direct way (plain tensors, no autograd, no mode, no autocast), the
layer keeps a :class:`Plan`: the implementation and its arguments after ``x``. The next call runs
the plan when it is still the same call, which :meth:`Plan.matches` decides from:

* ``x``: a plain tensor with the dtype, device and last dim of the planned call, and a size the
  output fits (the checks' limit);
* the state of torch: no ``torch.compile`` tracing, dispatch or function mode, or autocast;
  autograd needs no graph; the backend in force (``use_backend``, the environment) is the same;
* the layer's tensors: the same objects in the module's dicts, a float scale not modified since
  (``_version``), a Parameter's data not swapped (``data_ptr``).

Anything else the call depends on is a plain attribute (``training``, ``sparsity``, ``k``,
``backend``, ``out_features``): setting one drops the plan (:func:`drop`, called from the layers'
``__setattr__``), as do ``.to()`` / ``_apply`` and ``load_state_dict``. Inference tensors have no
version counter, so a scale that is one gets no plan (each call re-checks it, as before).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate as check
from .._ops import _function_mode_on, _get_dispatch_mode
from ..backends import requested
from ._config import _any_autocast

_Parameter = torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled


def eager_plain() -> bool:
    """True outside ``torch.compile`` tracing, dispatch and function modes, and autocast."""
    return not (_is_compiling() or _function_mode_on() or _any_autocast() or _get_dispatch_mode() is not None)


def _version(t: Tensor) -> int | None:
    return None if t.is_inference() else t._version


class Plan:
    """One planned call ``fn(x, *args)`` and what must hold for the next call to reuse it.

    ``owned``: ``(dict, key, tensor)`` triples, the module dicts (``_buffers``, ``_parameters``)
    that must still hold these tensors (``None`` for an absent bias); ``versions``: the float ones
    with their ``_version`` (also those whose ``requires_grad`` matters when grad mode is on).
    """

    __slots__ = (
        "fn",
        "args",
        "dtype",
        "device",
        "d",
        "max_numel",
        "backend",
        "requested",
        "owned",
        "versions",
        "pointers",
    )

    def __init__(self, fn, args: tuple, x: Tensor, out_features: int, backend: str, owned: tuple) -> None:
        self.fn, self.args = fn, args
        self.dtype, self.device, self.d = x.dtype, x.device, x.shape[-1]
        # check.MAX_NUMEL bounds x and the output ([rows, out_features]): rows <= R <=> numel <= (R + 1) d - 1
        rows = check.MAX_NUMEL // out_features if out_features > 0 else check.MAX_NUMEL
        self.max_numel = min(check.MAX_NUMEL, (rows + 1) * self.d - 1)
        self.backend, self.requested = backend, requested(backend)
        self.owned = owned
        tensors = [t for _, _, t in owned if t is not None]
        self.versions = tuple((t, t._version) for t in tensors if t.is_floating_point())
        self.pointers = tuple((t, t.data_ptr()) for t in tensors if type(t) is _Parameter)

    def matches(self, x: Tensor) -> bool:
        """Whether calling ``fn(x, *args)`` is what the full path would do now (module docstring)."""
        if (
            type(x) is not Tensor
            or x.dtype is not self.dtype
            or x.device != self.device
            or x.shape[-1] != self.d
            or x.numel() > self.max_numel
            or not eager_plain()
            or requested(self.backend) != self.requested
        ):
            return False
        for table, key, t in self.owned:
            if table.get(key) is not t:
                return False
        for t, v in self.versions:
            if t._version != v:
                return False
        for t, p in self.pointers:
            if t.data_ptr() != p:
                return False
        if _grad_enabled() and (x.requires_grad or any(t.requires_grad for t, _ in self.versions)):
            return False
        return True


def plan(fn, args: tuple, x: Tensor, out_features: int, backend: str, owned: tuple) -> Plan | None:
    """A :class:`Plan` for the call ``fn(x, *args)`` just made, or None where none may be kept:
    not the direct way (a mode, autocast, autograd), or a float tensor without a version counter."""
    if type(x) is not Tensor or not eager_plain() or x.dim() < 1:
        return None
    for _, _, t in owned:
        if t is None:
            continue
        if (type(t) is not Tensor and type(t) is not _Parameter) or (t.is_floating_point() and _version(t) is None):
            return None
    p = Plan(fn, args, x, out_features, backend, owned)
    return p if p.matches(x) else None


def drop(mod) -> None:
    """Forget ``mod``'s plan and its sibling group's (an attribute the call depends on changed)."""
    d = mod.__dict__
    d.pop("_plan", None)
    group = d.get("_siblings")
    if group is not None:
        group._plan = None
