"""One-call model conversion: swap ``nn.Linear`` layers for Q-Sparse layers in place.

Usage (the shape of torchao's ``quantize_(model, config, filter_fn)``)::

    import qsparse_kernels as qk
    qk.convert(model, qk.QSparseConfig(sparsity=0.5))                       # dense weights
    qk.convert(model, qk.QSparseConfig(sparsity={                            # the paper's Mistral recipe
        "*.[qkv]_proj": 0.42, "*.o_proj": 0.40, "*.up_proj": 0.40, "*.gate_proj": 0.40, "*.down_proj": 0.60}))
    qk.convert(model, qk.QSparseConfig(sparsity=0.6, weights="ternary"))    # BitNet b1.58 + Q-Sparse

Which layers: by default every ``nn.Linear`` except the output head, i.e. except a Linear whose
qualified name is or ends in ``lm_head`` or ``classifier``, the model's
``get_output_embeddings()`` (Hugging Face), a Linear whose weight is tied to an ``nn.Embedding``,
and ``nn.MultiheadAttention``'s ``out_proj`` (its weight is used without calling the module).
A ``filter_fn(module, qualified_name) -> bool`` replaces that default; it is called for every
``nn.Linear``.

Per-layer sparsity: a mapping ``{pattern: sparsity}``; patterns are ``fnmatch`` globs matched
(case-sensitive) against the full qualified module name, e.g. ``"model.layers.*.mlp.down_proj"`` or
``"*.down_proj"``. The first matching pattern wins (mapping order); a selected Linear that no
pattern matches stays ``nn.Linear``; a pattern that wins for no layer raises ``ValueError`` (a typo,
or shadowed by an earlier pattern).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from . import _validate as check
from ._frozen import FrozenMapping
from .backends import CHOICES
from .nn import BitLinear, QSparseLinear

WEIGHT_MODES = ("dense", "ternary")
HEAD_NAMES = ("lm_head", "classifier")

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class QSparseConfig:
    """What :func:`convert` does to each selected ``nn.Linear``.

    Args:
        sparsity: a float in ``[0, 1)`` for every layer, or ``{fnmatch pattern: float}`` per
            layer (first match wins, see the module docstring). Ignored for layers using ``block``.
        weights: ``"dense"`` -> :class:`~qsparse_kernels.nn.QSparseLinear` (same float weights);
            ``"ternary"`` -> :class:`~qsparse_kernels.nn.BitLinear` (BitNet b1.58, fake-quantized
            training mode).
        block: ``(n, m)`` for Block Q-Sparse (N:M, e.g. ``(16, 32)``); dense weights only.
        backend: ``"auto"`` or a backend name, stored on every converted layer.
        pack: with ``weights="ternary"``, pack the ternary weights right away (inference only).
    """

    sparsity: float | Mapping[str, float] = 0.5
    weights: str = "dense"
    block: tuple[int, int] | None = None
    backend: str = "auto"
    pack: bool = False

    def __post_init__(self) -> None:
        where = "QSparseConfig"
        if isinstance(self.sparsity, Mapping):
            if not self.sparsity:
                raise ValueError("qsparse_kernels.QSparseConfig: the sparsity mapping is empty")
            values = {}
            for pat, s in self.sparsity.items():
                if not isinstance(pat, str):
                    raise TypeError(f"qsparse_kernels.QSparseConfig: sparsity patterns must be str, got {pat!r}")
                values[pat] = check.sparsity(f"{where}.sparsity[{pat!r}]", s)
            object.__setattr__(self, "sparsity", FrozenMapping(values))  # read-only, hashable
        else:
            object.__setattr__(self, "sparsity", check.sparsity(f"{where}.sparsity", self.sparsity))
        if self.weights not in WEIGHT_MODES:
            raise ValueError(
                f"qsparse_kernels.QSparseConfig: weights must be one of {WEIGHT_MODES}, got {self.weights!r}"
            )
        if self.block is not None:
            if not isinstance(self.block, (tuple, list)) or len(self.block) != 2:
                raise ValueError(f"qsparse_kernels.QSparseConfig: block must be a pair (n, m), got {self.block!r}")
            n, m = self.block
            check.integer(where, "block m", m, 1)
            check.integer(where, "block n", n, 0, m, "m")
            object.__setattr__(self, "block", (int(n), int(m)))
            if self.weights != "dense":
                raise ValueError("qsparse_kernels.QSparseConfig: block (N:M) sparsity needs weights='dense'")
            if isinstance(self.sparsity, Mapping):
                raise ValueError("qsparse_kernels.QSparseConfig: give either a per-layer sparsity mapping or block")
        if not isinstance(self.backend, str) or self.backend not in CHOICES:
            raise ValueError(f"qsparse_kernels.QSparseConfig: backend must be one of {CHOICES}, got {self.backend!r}")
        if self.pack and self.weights != "ternary":
            raise ValueError("qsparse_kernels.QSparseConfig: pack=True needs weights='ternary'")

    def match(self, name: str) -> tuple[str | None, float | None]:
        """``(winning pattern, sparsity)`` for the layer ``name``; ``(None, s)`` for a single float,
        ``(None, None)`` when no pattern matches."""
        if not isinstance(self.sparsity, Mapping):
            return None, float(self.sparsity)
        for pat, s in self.sparsity.items():
            if fnmatch.fnmatchcase(name, pat):
                return pat, float(s)
        return None, None


def _plain_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) and not isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear)


def default_filter(model: nn.Module) -> FilterFn:
    """The default layer selection for ``model``: every ``nn.Linear`` except the output head
    (see the module docstring)."""
    emb = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None

    def tied(w) -> bool:
        return any(w is e or (w.data_ptr() == e.data_ptr() and w.shape == e.shape) for e in emb)

    def keep(mod: nn.Module, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return _plain_linear(mod) and leaf not in HEAD_NAMES and mod is not head and not tied(mod.weight)

    return keep


def _swap(linear: nn.Linear, name: str, sparsity: float, config: QSparseConfig) -> nn.Module:
    try:
        if config.weights == "ternary":
            mod = BitLinear.from_linear(linear, sparsity=sparsity, backend=config.backend)
            return mod.pack() if config.pack else mod
        return QSparseLinear.from_linear(linear, sparsity=sparsity, block=config.block, backend=config.backend)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"qsparse_kernels.convert: layer {name!r}: {exc}") from exc


def convert(model: nn.Module, config: QSparseConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers of ``model`` in place; returns ``model``.

    Each converted layer shares the Linear's weight and bias Parameters (no copy; dense weights
    move to the fast layout in place), so optimizers built before the conversion keep working.
    A Linear reachable under several names is converted once and replaced everywhere. If
    ``model`` itself is a selected Linear, the new module is returned.

    Raises ``ValueError`` for a sparsity pattern that wins for no layer or a layer the config
    cannot apply to (the message names the layer).
    """
    if not isinstance(config, QSparseConfig):
        raise TypeError(f"qsparse_kernels.convert: config must be a QSparseConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"qsparse_kernels.convert: model must be an nn.Module, got {type(model).__name__}")
    keep = filter_fn if filter_fn is not None else default_filter(model)
    plan: dict[int, tuple[str, nn.Linear, float]] = {}
    used: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not keep(mod, name):
            continue
        pat, s = config.match(name)
        if s is None:
            continue
        used.add(pat)
        plan[id(mod)] = (name, mod, s)
    if isinstance(config.sparsity, Mapping):
        unused = [p for p in config.sparsity if p not in used]
        if unused:
            raise ValueError(
                f"qsparse_kernels.convert: sparsity pattern(s) {unused} matched no selected nn.Linear "
                "(or only layers an earlier pattern already matched); patterns are fnmatch globs on "
                "qualified names such as 'model.layers.0.mlp.down_proj'"
            )
    new = {key: _swap(lin, name, s, config) for key, (name, lin, s) in plan.items()}
    for parent in list(model.modules()):
        for child_name, child in parent._modules.items():
            if child is not None and id(child) in new:
                parent._modules[child_name] = new[id(child)]
    return new.get(id(model), model)


__all__ = ["QSparseConfig", "convert", "default_filter", "WEIGHT_MODES"]
