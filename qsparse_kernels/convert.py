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

Per-layer settings of any field: ``layers={pattern: overrides}``, where ``overrides`` is a dict of
any of ``sparsity``, ``k``, ``weights``, ``block``, ``backend``, ``pack`` (a float is short for
``{"sparsity": float}``, ``None`` leaves the layer ``nn.Linear``). The first matching pattern wins;
a selected layer that no pattern matches takes the top-level fields::

    qk.convert(model, qk.QSparseConfig(sparsity=0.4, layers={
        "*.down_proj": {"sparsity": 0.6, "weights": "ternary", "pack": True},
        "*.gate_proj": {"block": (16, 32)},
        "*.o_proj": None}))

What it did: ``verbose=True`` prints a :class:`~qsparse_kernels.convert_report.ConversionReport`
(layers per kind, kept fraction, weight bytes read per decoded token before and after);
``return_report=True`` returns ``(model, report)``. A model that already holds Q-Sparse layers is
converted once: a second ``convert`` without ``filter_fn`` raises (pass a ``filter_fn`` to convert
more of its plain ``nn.Linear`` layers on purpose). :func:`unconvert` turns the float layers back
into plain ``nn.Linear``.

Hugging Face BitNet checkpoints (``quant_method == "bitnet"``, loaded with ``from_pretrained``):
their ``BitLinear`` / ``AutoBitLinear`` layers are selected like ``nn.Linear`` and become this
library's ``BitLinear`` (packed, without a float copy; :mod:`qsparse_kernels.bitnet_import`) with
the config's ``sparsity`` / ``k`` / ``backend``; ``weights`` does not apply (they are ternary
already) and ``block`` is refused.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import _hf_hook
from . import _validate as check
from ._frozen import FrozenMapping
from .backends import CHOICES
from .bitnet_import import from_hf_bitnet, is_hf_bitnet
from .convert_report import ConversionReport, build_report, linear_layers, weight_bytes_per_token
from .nn import BitLinear, DenseHead, QSparseLinear, RMSNorm
from .nn._siblings import group_siblings, ungroup
from .nn.rms_norm import LLAMA_STYLE

WEIGHT_MODES = ("dense", "ternary")
HEAD_NAMES = ("lm_head", "classifier")
LAYER_FIELDS = ("sparsity", "k", "weights", "block", "backend", "pack")

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
        k: a fixed kept count for every layer (overrides ``sparsity``; ``0 <= k <= in_features``).
        layers: ``{fnmatch pattern: overrides}``: per-layer values of any field above (a dict with
            keys from :data:`LAYER_FIELDS`; a float is short for ``{"sparsity": float}``; ``None``
            leaves the layer ``nn.Linear``). First match wins; unmatched layers take the top-level
            fields. Not together with a sparsity mapping.
    """

    sparsity: float | Mapping[str, float] = 0.5
    weights: str = "dense"
    block: tuple[int, int] | None = None
    backend: str = "auto"
    pack: bool = False
    k: int | None = None
    layers: Mapping[str, float | Mapping | None] | None = None

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
        if self.k is not None:
            check.integer(where, "k", self.k, 0)
        self._check_layers()

    def _check_layers(self) -> None:
        """Normalise ``layers`` to ``{pattern: overrides or None}`` (read-only) and validate each
        pattern's resulting config now (the error names the pattern)."""
        if self.layers is None:
            object.__setattr__(self, "_resolved", None)
            return
        if not isinstance(self.layers, Mapping) or not self.layers:
            raise ValueError(f"qsparse_kernels.QSparseConfig: layers must be a non-empty mapping, got {self.layers!r}")
        if isinstance(self.sparsity, Mapping):
            raise ValueError("qsparse_kernels.QSparseConfig: give either a sparsity mapping or layers, not both")
        normal, resolved = {}, []
        for pat, value in self.layers.items():
            if not isinstance(pat, str):
                raise TypeError(f"qsparse_kernels.QSparseConfig: layers patterns must be str, got {pat!r}")
            if value is None:
                normal[pat] = None
                resolved.append((pat, None))
                continue
            over = {"sparsity": value} if not isinstance(value, Mapping) else dict(value)
            bad = sorted(set(over) - set(LAYER_FIELDS))
            if bad:
                raise ValueError(
                    f"qsparse_kernels.QSparseConfig: layers[{pat!r}] has unknown field(s) {bad}; "
                    f"fields are {LAYER_FIELDS}"
                )
            if "sparsity" in over and "k" not in over:
                over.setdefault("k", None)  # a layer's own sparsity replaces a top-level k
            try:
                cfg = replace(self, layers=None, **over)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"qsparse_kernels.QSparseConfig: layers[{pat!r}]: {exc}") from exc
            normal[pat] = FrozenMapping(over)
            resolved.append((pat, cfg))
        object.__setattr__(self, "layers", FrozenMapping(normal))  # read-only, hashable
        object.__setattr__(self, "_resolved", tuple(resolved))

    def resolve(self, name: str) -> tuple[str | None, QSparseConfig | None]:
        """``(winning pattern, the config for layer name)``; the config is ``None`` when the layer
        stays ``nn.Linear``, the pattern ``None`` when no pattern decided."""
        if self._resolved is not None:
            for pat, cfg in self._resolved:
                if fnmatch.fnmatchcase(name, pat):
                    return pat, cfg
            return None, replace(self, layers=None)
        pat, s = self.match(name)
        if s is None:
            return None, None
        if isinstance(self.sparsity, Mapping):
            return pat, replace(self, sparsity=s, k=None)
        return None, self

    def patterns(self) -> list[str]:
        """Every pattern of the config (of ``layers`` or of a sparsity mapping), in order."""
        if self.layers is not None:
            return list(self.layers)
        return list(self.sparsity) if isinstance(self.sparsity, Mapping) else []

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


def _convertible(mod: nn.Module) -> bool:
    """What ``convert`` may replace: an ``nn.Linear`` or a transformers BitNet layer."""
    return isinstance(mod, nn.Linear) or is_hf_bitnet(mod)


def _output_head(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()`` (transformers models), or None."""
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            return get_out()
        except (NotImplementedError, AttributeError):
            return None
    return None


def default_filter(model: nn.Module) -> FilterFn:
    """The default layer selection for ``model``: every ``nn.Linear`` except the output head
    (see the module docstring)."""
    emb = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    head = _output_head(model)

    def tied(w) -> bool:
        return any(w is e or (w.data_ptr() == e.data_ptr() and w.shape == e.shape) for e in emb)

    def keep(mod: nn.Module, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        linear = _plain_linear(mod) or is_hf_bitnet(mod)
        return linear and leaf not in HEAD_NAMES and mod is not head and not tied(mod.weight)

    return keep


def _swap(linear: nn.Linear, name: str, config: QSparseConfig) -> nn.Module:
    """The Q-Sparse layer for ``linear`` under its resolved ``config`` (scalar sparsity, no ``layers``)."""
    sparsity, k = config.sparsity, config.k
    if is_hf_bitnet(linear):  # a ternary layer already: weights= does not apply, block= cannot
        if config.block is not None:
            raise ValueError(f"qsparse_kernels.convert: layer {name!r} is a BitNet (ternary) layer; block needs dense")
        try:
            return from_hf_bitnet(linear, name, sparsity, k, config.backend, config.pack)
        except (ValueError, TypeError) as exc:
            if repr(name) in str(exc):
                raise
            raise type(exc)(f"qsparse_kernels.convert: layer {name!r}: {exc}") from exc
    try:
        if config.weights == "ternary":
            mod = BitLinear.from_linear(linear, sparsity=sparsity, k=k, backend=config.backend)
            return mod.pack() if config.pack else mod
        return QSparseLinear.from_linear(linear, sparsity=sparsity, k=k, block=config.block, backend=config.backend)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"qsparse_kernels.convert: layer {name!r}: {exc}") from exc


def convert(
    model: nn.Module,
    config: QSparseConfig,
    filter_fn: FilterFn | None = None,
    *,
    verbose: bool = False,
    return_report: bool = False,
    fuse_siblings: bool = True,
    fast_head: bool = True,
    fast_norm: bool = True,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace the selected ``nn.Linear`` layers of ``model`` in place; returns ``model`` (and the
    :class:`~qsparse_kernels.convert_report.ConversionReport` with ``return_report=True``;
    ``verbose=True`` prints it).

    Each converted layer shares the Linear's weight and bias Parameters (no copy; dense weights
    move to the fast layout in place), so optimizers built before the conversion keep working.
    A Linear reachable under several names is converted once and replaced everywhere. If
    ``model`` itself is a selected Linear, the new module is returned.

    ``fuse_siblings`` (default True): converted layers that the model calls with the same input
    (``q_proj`` / ``k_proj`` / ``v_proj`` and ``gate_proj`` / ``up_proj`` children of one parent, with
    the same settings) are linked in a :class:`~qsparse_kernels.nn.SiblingGroup`: in inference they
    share one top-K (and int8 quantization) and one kernel call, with bit-identical outputs, and fall
    back to separate calls whenever they do not in fact get the same input (see
    :mod:`qsparse_kernels.nn._siblings`). The report lists the groups (``sibling_groups``).

    ``fast_head`` (default True): the dense output head (a plain ``nn.Linear`` named ``lm_head`` or
    ``classifier``, or ``model.get_output_embeddings()``, that the conversion left alone) becomes a
    :class:`~qsparse_kernels.nn.DenseHead`: still dense, same Parameters, layout and tying, but
    its CPU inference at 1 to 4 rows runs the library's dense GEMV.

    ``fast_norm`` (default True): the model's RMSNorm modules of a class that computes HF Llama's
    RMSNorm (:data:`~qsparse_kernels.nn.rms_norm.LLAMA_STYLE`) become a
    :class:`~qsparse_kernels.nn.RMSNorm` (same ``weight`` Parameter), whose CPU inference is one
    kernel call instead of ~9 torch ops (:func:`use_fast_norm`).

    Raises ``ValueError`` for a pattern that wins for no layer, a layer the config cannot apply
    to (the message names the layer), or a model that is already converted (unless ``filter_fn``
    is given: then only the plain ``nn.Linear`` layers it selects are converted).
    """
    if not isinstance(config, QSparseConfig):
        raise TypeError(f"qsparse_kernels.convert: config must be a QSparseConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"qsparse_kernels.convert: model must be an nn.Module, got {type(model).__name__}")
    done = [n for n, m in model.named_modules() if isinstance(m, (QSparseLinear, BitLinear))]
    if done and filter_fn is None:
        raise ValueError(
            f"qsparse_kernels.convert: the model is already converted ({len(done)} Q-Sparse layer(s), e.g. "
            f"{done[0] or '<root>'!r}); convert once with one QSparseConfig (layers= sets any field per "
            "pattern), or call qsparse_kernels.unconvert(model) first; to convert more of its plain "
            "nn.Linear layers on purpose, pass filter_fn"
        )
    keep = filter_fn if filter_fn is not None else default_filter(model)
    before = sum(weight_bytes_per_token(m) for m in linear_layers(model).values())
    plan: dict[int, tuple[str, nn.Linear, QSparseConfig]] = {}
    used: set[str] = set()
    for name, mod in model.named_modules():
        if not _convertible(mod) or not keep(mod, name):
            continue
        pat, layer_config = config.resolve(name)
        used.add(pat)
        if layer_config is not None:
            plan[id(mod)] = (name, mod, layer_config)
    unused = [p for p in config.patterns() if p not in used]
    if unused:
        raise ValueError(
            f"qsparse_kernels.convert: pattern(s) {unused} matched no selected nn.Linear "
            "(or only layers an earlier pattern already matched); patterns are fnmatch globs on "
            "qualified names such as 'model.layers.0.mlp.down_proj'"
        )
    # Each new layer takes the train / eval mode of the Linear it replaces (a converted eval model stays in eval).
    new = {key: _swap(lin, name, layer_config).train(lin.training) for key, (name, lin, layer_config) in plan.items()}
    _replace_modules(model, new)
    root = new.get(id(model), model)
    if fast_head:
        use_dense_head(root)
    if fast_norm:
        use_fast_norm(root)
    _sync_hf(root)
    groups = group_siblings(root) if fuse_siblings else []
    report = build_report(before, root, {plan[key][0]: mod for key, mod in new.items()}, groups)
    if verbose:
        print(report)
    return (root, report) if return_report else root


def use_dense_head(model: nn.Module) -> None:
    """Make each plain ``nn.Linear`` output head of ``model`` (named ``lm_head`` / ``classifier``, or
    ``model.get_output_embeddings()``) a :class:`~qsparse_kernels.nn.DenseHead`, in place (same
    Parameters); what ``convert(fast_head=True)`` and loading a converted checkpoint do."""
    out = _output_head(model)
    heads = {}
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and (name.rsplit(".", 1)[-1] in HEAD_NAMES or mod is out):
            heads[id(mod)] = DenseHead.from_linear(mod)
    _replace_modules(model, heads)


def use_fast_norm(model: nn.Module) -> int:
    """Make each module of ``model`` whose class computes HF Llama's RMSNorm (its name is in
    :data:`~qsparse_kernels.nn.rms_norm.LLAMA_STYLE`) a :class:`~qsparse_kernels.nn.RMSNorm`
    sharing its ``weight``, in place; returns how many. What ``convert(fast_norm=True)`` and
    loading a converted checkpoint do; :func:`unconvert` turns them back."""
    new = {id(m): RMSNorm.from_module(m) for m in model.modules() if type(m).__name__ in LLAMA_STYLE}
    _replace_modules(model, new)
    return len(new)


def _replace_modules(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Swap every child ``c`` of every module of ``model`` with ``new[id(c)]`` where present."""
    for parent in list(model.modules()):
        for child_name, child in parent._modules.items():
            if child is not None and id(child) in new:
                parent._modules[child_name] = new[id(child)]


def _linear_sharing(mod: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``mod``'s ``weight`` and ``bias`` Parameters (no copy)."""
    lin = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta", dtype=mod.weight.dtype)
    lin.weight = mod.weight
    lin.bias = mod.bias
    return lin


def _to_linear(mod: QSparseLinear | BitLinear) -> nn.Linear:
    """A plain ``nn.Linear`` sharing ``mod``'s float ``weight`` and ``bias`` Parameters; the weight
    goes back to the row-major layout in place (same Parameter object)."""
    if not mod.weight.is_contiguous():
        with torch.no_grad():
            mod.weight.data = mod.weight.data.contiguous()
    return _linear_sharing(mod)


def _plain_head(head: DenseHead) -> nn.Linear:
    """``head`` as the plain ``nn.Linear`` it was (same Parameters, layout and mode)."""
    return _linear_sharing(head).train(head.training)


def unconvert(model: nn.Module, filter_fn: FilterFn | None = None) -> nn.Module:
    """Turn the float Q-Sparse layers of ``model`` back into plain ``nn.Linear``, in place; returns
    ``model`` (or the new Linear when ``model`` itself is such a layer).

    ``QSparseLinear`` and training-mode ``BitLinear`` layers become ``nn.Linear`` sharing their
    ``weight`` and ``bias`` Parameters (so optimizers keep them): the same function without top-K
    (and, for ``BitLinear``, without fake quantization); a ``DenseHead`` becomes the plain
    ``nn.Linear`` it was, and an :class:`~qsparse_kernels.nn.RMSNorm` made by ``convert`` the module
    of the class it replaced. A packed ``BitLinear`` holds no float
    weight: it raises ``ValueError`` naming the layer (``filter_fn(module, name) -> bool`` can leave
    it out). Shapes: unchanged, ``[..., in_features] -> [..., out_features]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qsparse_kernels.unconvert: model must be an nn.Module, got {type(model).__name__}")
    chosen = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (QSparseLinear, BitLinear)) and (filter_fn is None or filter_fn(m, name))
    }
    packed = [name or "<root>" for name, m in chosen.items() if isinstance(m, BitLinear) and m.is_packed]
    if packed:
        raise ValueError(
            f"qsparse_kernels.unconvert: packed BitLinear layer(s) {packed[:4]} hold no float weight "
            "(inference only); leave them out with filter_fn"
        )
    for m in chosen.values():
        ungroup(m)  # its siblings (if they stay converted) compute alone from now on
    new = {id(m): _to_linear(m) for m in chosen.values()}
    for name, m in model.named_modules():
        if type(m) is DenseHead and (filter_fn is None or filter_fn(m, name)):
            new[id(m)] = _plain_head(m)
        elif type(m) is RMSNorm and m._hf_class is not None and (filter_fn is None or filter_fn(m, name)):
            new[id(m)] = m.to_module()
    _replace_modules(model, new)
    root = new.get(id(model), model)
    _sync_hf(root)
    return root


def _sync_hf(model: nn.Module) -> None:
    """A transformers model gets (or loses) its ``quantization_config``, so ``save_pretrained``
    writes the converted layers' settings (:mod:`qsparse_kernels.hf_quantizer`)."""
    if _hf_hook.is_hf_model(model):
        from . import hf_quantizer

        hf_quantizer.attach(model)


__all__ = ["QSparseConfig", "convert", "unconvert", "default_filter", "WEIGHT_MODES", "LAYER_FIELDS"]
