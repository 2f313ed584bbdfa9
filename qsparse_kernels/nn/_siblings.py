"""Sibling projections share one kernel call: q/k/v, gate/up (:func:`qsparse_kernels.convert` groups them).

A :class:`SiblingGroup` links converted layers under one parent that a model calls with the same
input (``{q_proj, k_proj, v_proj}``, ``{gate_proj, up_proj}``). Each member's ``forward`` first asks
its group (``module._siblings``): the first member called with ``x`` computes every member's output
with one :mod:`qsparse_kernels.sibling_ops` call (one top-K, one int8 quantization, one native call)
and keeps the others' outputs; a sibling called with that same ``x`` takes its output, once. The
model's code is not touched: Hugging Face's attention and MLP call ``q_proj(h)``, ``k_proj(h)``,
``v_proj(h)`` one after the other, and each call is answered.

"The same x" is the same tensor object, unmodified since (``x._version``), with the same data
pointer, shape and strides. Inference tensors (``torch.inference_mode``) have no version counter:
for them an in-place write into ``x`` between two sibling calls cannot be seen, and a sibling would
get the output for ``x`` as it was at the first call.

The group answers ``None`` (the member computes its own output, unfused, exactly as without a
group) for a different input (a forward pre-hook that replaces it, a model that feeds siblings
different tensors), in training mode, when autograd needs a graph (grad enabled and ``x`` or a
parameter requires grad), under ``torch.compile``, dispatch or function modes and autocast, for
tensor subclasses, and when the members' settings differ (kept count, backend, dtype, device,
packed or not). If a fused result is still not fully taken when the next one would be computed
(the siblings do not in fact share their input in this model), the group stops fusing for good
(``disabled``) so no work is wasted; it holds its cached outputs only until each member took its own,
per thread. Outputs are bit-identical (``torch.equal``) to the unfused layers'.

The group holds no parameters or buffers: ``state_dict``, ``parameters()``, ``.to()``, checkpoints,
``save_pretrained`` and :func:`qsparse_kernels.unconvert` see the layers as without it.

Packed ``BitLinear`` siblings on the CPU are stored side by side (:func:`store_side_by_side`) when
their merged row fits the CPU's one-row pass (8192 bytes with AVX-512, 3072 with AVX2): each one's
``packed`` buffer becomes a column range of one ``[in_features, sum of ceil(out / 4)]`` uint8
buffer, the same bytes in the same memory as before. The fused kernel then reads a kept input
feature's bytes of every sibling as one run (TinyLlama's q/k/v: one 640-byte run instead of 512 +
64 + 64 bytes in three places, which DRAM serves far worse). Each layer still works alone on its
view; ``state_dict`` gives each a contiguous copy (what checkpoints and ``save_pretrained`` need),
``load_state_dict`` copies into the views, and anything that replaces a buffer (``.to(device)``,
assigning it) only loses the speed-up.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch import Tensor, nn

from .. import _native, sibling_ops
from . import _fastpath
from ._fastpath import _version
from .bitlinear import BitLinear
from .linear import QSparseLinear

# Children of one parent that a model calls with the same input (HF Llama / Mistral / Qwen2 and
# the compact Llama of qsparse_kernels.bench use these names).
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))



def _where(x: Tensor) -> tuple:
    return x.data_ptr(), x.shape, x.stride()


class SiblingGroup:
    """Layers that read the same input, computed with one multi-segment call (module docstring).

    Args:
        members: two or more ``QSparseLinear`` (float, not N:M) or two or more ``BitLinear``, with
            the same class, ``in_features``, sparsity / ``k`` and backend (:func:`compatible`).
    """

    def __init__(self, members: list[nn.Module]) -> None:
        if len(members) < 2 or not compatible(members):
            raise ValueError("qsparse_kernels.SiblingGroup: needs two or more compatible layers")
        self.members = tuple(members)
        self.disabled = False
        self._local = threading.local()
        self._plan = None  # the last fused call, remembered (nn/_fastpath.py); members' __setattr__ drops it
        for m in self.members:
            m._siblings = self

    # threading.local does not pickle or deepcopy: a copy starts with an empty cache.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_plan")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._plan = None

    def dissolve(self) -> None:
        """Unlink the members (each computes alone again) and drop any cached outputs."""
        for m in self.members:
            if m.__dict__.get("_siblings") is self:
                del m._siblings
        self._local = threading.local()
        self._plan = None
        self.disabled = True

    def output(self, mod: nn.Module, x: Tensor) -> Tensor | None:
        """``mod``'s output for ``x`` from a fused call, or ``None``: ``mod`` computes it itself."""
        if self.disabled:
            return None
        local = self._local
        pending = getattr(local, "pending", None)  # [x, its version, _where(x), outputs, how many not taken]
        i = self._index(mod)
        if pending is not None and pending[0] is x and pending[1] == _version(x) and pending[2] == _where(x):
            outs = pending[3]
            y = outs[i]
            if y is None:  # this member already took its output: called again, compute alone
                return None
            outs[i] = None
            pending[4] -= 1
            if pending[4] == 0:
                local.pending = None
            return y
        if i < 0:
            return None
        plan = self._plan
        if plan is not None and plan.matches(x):
            call = functools.partial(plan.fn, x, *plan.args)
        else:
            call = self._fused_call(x)
            if call is None:
                return None
        if pending is not None:  # the last fused result was not taken by every member: stop fusing
            local.pending = None
            self.disabled = True
            return None
        outs = list(call())
        y = outs[i]
        outs[i] = None
        local.pending = [x, _version(x), _where(x), outs, len(outs) - 1]
        return y

    def _index(self, mod: nn.Module) -> int:
        for i, m in enumerate(self.members):
            if m is mod:
                return i
        return -1

    def _fused_call(self, x: Tensor):
        """A function computing every member's output for ``x`` with one multi-segment call, or
        ``None`` when the members must compute alone (module docstring); remembers the call as the
        group's plan. Reads the parameters and buffers from the modules' dicts
        (``nn.Module.__getattr__`` costs ~0.5 us a lookup)."""
        if type(x) is not Tensor or x.dim() < 1:
            return None
        if not _fastpath.eager_plain():
            return None
        grad = torch.is_grad_enabled()
        if grad and x.requires_grad:
            return None
        ms = self.members
        first = ms[0]
        if x.shape[-1] != first.in_features or not compatible(ms):
            return None
        dev, dt = x.device, x.dtype
        sparse = type(first) is QSparseLinear
        if not sparse and dt not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        weights, biases, owned = [], [], []
        for m in ms:
            if m.training:
                return None
            params = m._parameters
            b = params.get("bias")
            if b is not None and (
                (type(b) is not nn.Parameter and type(b) is not Tensor)
                or b.dtype != dt
                or b.device != dev
                or (grad and b.requires_grad)
            ):
                return None
            biases.append(b)
            owned.append((params, "bias", b))
            if sparse:
                w = params.get("weight")
                if w is None or (type(w) is not nn.Parameter and type(w) is not Tensor):
                    return None
                if w.dtype != dt or w.device != dev or (grad and w.requires_grad):
                    return None
                weights.append(w)
                owned.append((params, "weight", w))
            else:
                packed, scale = m._buffers.get("packed"), m._buffers.get("scale")
                if packed is None or scale is None or packed.device != dev or scale.device != dev:
                    return None
                weights.append((packed, scale))
                owned += [(m._buffers, "packed", packed), (m._buffers, "scale", scale)]
        k = first.kept(x.shape[-1])
        if sparse:
            fn = sibling_ops.implementation("sparse_linear_multi", first.backend, dev)
            args = (weights, k, biases)
        else:
            fn = sibling_ops.implementation("ternary_linear_multi", first.backend, dev)
            args = ([p for p, _ in weights], [s for _, s in weights], [m.out_features for m in ms], k, biases)
        widest = max(m.out_features for m in ms)
        self._plan = _fastpath.plan(fn, args, x, widest, first.backend, tuple(owned))
        return functools.partial(fn, x, *args)

    def __repr__(self) -> str:
        return f"SiblingGroup({len(self.members)} layers, disabled={self.disabled})"


def compatible(members) -> bool:
    """Whether ``members`` may share one call: one class (``QSparseLinear`` without N:M blocks, or
    ``BitLinear``), the same ``in_features``, sparsity, ``k`` and backend."""
    first = members[0]
    if type(first) not in (QSparseLinear, BitLinear):
        return False
    if isinstance(first, QSparseLinear) and first.block is not None:
        return False
    sig = (type(first), first.in_features, first.sparsity, first.k, first.backend, getattr(first, "block", None))
    for m in members[1:]:
        if (type(m), m.in_features, m.sparsity, m.k, m.backend, getattr(m, "block", None)) != sig:
            return False
    return True


def group_siblings(model: nn.Module, names=SIBLING_NAMES) -> list[str]:
    """Link every set of sibling layers of ``model`` (children of one parent named as in ``names``,
    two or more of them converted and :func:`compatible`) into a :class:`SiblingGroup`; a layer's
    earlier group is dissolved first. Returns the groups' qualified names, such as
    ``"model.layers.0.self_attn.{q_proj,k_proj,v_proj}"``."""
    made = []
    for pname, parent in model.named_modules():
        for group in names:
            members = [(n, parent._modules.get(n)) for n in group]
            members = [(n, m) for n, m in members if isinstance(m, (QSparseLinear, BitLinear))]
            if len(members) < 2 or not compatible([m for _, m in members]):
                continue
            if len({id(m) for _, m in members}) != len(members):  # one module under two names
                continue
            for _, m in members:
                ungroup(m)
            SiblingGroup([m for _, m in members])
            store_side_by_side([m for _, m in members])
            made.append(f"{pname + '.' if pname else ''}{{{','.join(n for n, _ in members)}}}")
    return made


def store_side_by_side(members) -> bool:
    """Make the ``packed`` buffers of ``members`` (packed :class:`BitLinear` layers on the CPU with
    the same ``in_features``) column ranges of one uint8 ``[in_features, sum of ceil(out / 4)]``
    buffer, in order (module docstring). No-op (returns False) for other layers, other devices,
    buffers already stored so, and rows wider than the CPU's M = 1 pass reads as one weight
    (``_C.cpu_ternary_merge_max_bytes()``: 8192 bytes with AVX-512, 3072 with AVX2). Memory does
    not grow: the old buffers are released."""
    bufs = [m._buffers.get("packed") if type(m) is BitLinear else None for m in members]
    if any(b is None or b.device.type != "cpu" or b.dtype != torch.uint8 or b.dim() != 2 for b in bufs):
        return False
    if len({b.shape[0] for b in bufs}) != 1:
        return False
    if _native.loaded() and sum(b.shape[1] for b in bufs) > _native._C.cpu_ternary_merge_max_bytes():
        return False  # wider than the M = 1 pass reads at once: each would read every other run of bytes
    stride = bufs[0].stride(0)
    if all(b.stride(0) == stride and b.stride(1) == 1 for b in bufs) and all(
        nxt.data_ptr() == b.data_ptr() + b.shape[1] for b, nxt in zip(bufs, bufs[1:], strict=False)
    ):
        return False
    with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor: load_state_dict copies into it
        cat = torch.cat(bufs, dim=1)
    at = 0
    for m, b in zip(members, bufs, strict=True):
        m._buffers["packed"] = cat[:, at : at + b.shape[1]]
        at += b.shape[1]
    return True


def ungroup(mod: nn.Module) -> None:
    """Dissolve ``mod``'s sibling group, if it has one."""
    group = mod.__dict__.get("_siblings")
    if group is not None:
        group.dissolve()
