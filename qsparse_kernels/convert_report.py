"""What :func:`qsparse_kernels.convert` did to a model: layers per kind, kept fraction, bytes read.

"Weight bytes read per token" is what one decoded token (batch 1) reads from the weights of the
model's linear layers: a dense ``nn.Linear`` reads all ``in * out`` weights, a ``QSparseLinear``
only the ``k`` kept input rows (``k * out``), a packed ``BitLinear`` 2 bits per weight of the kept
rows (``k * ceil(out / 4)`` bytes), a training-mode ``BitLinear`` its whole float weight (fake
quantization reads it all). Biases, norms and embeddings (one row per token) are left out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from .bitnet_import import is_hf_bitnet
from .layout import packed_cols
from .nn import BitLinear, QSparseLinear

KEPT_DENSE = "nn.Linear (not converted)"


def layer_kind(mod: nn.Module) -> str | None:
    """The report's name for a linear-like module, ``None`` for anything else."""
    if isinstance(mod, QSparseLinear):
        return "QSparseLinear (N:M)" if mod.block is not None else "QSparseLinear"
    if isinstance(mod, BitLinear):
        return "BitLinear (packed)" if mod.is_packed else "BitLinear (training)"
    if is_hf_bitnet(mod):
        return f"transformers BitNet {type(mod).__name__}"
    if isinstance(mod, nn.Linear):
        return KEPT_DENSE
    return None


def weight_bytes_per_token(mod: nn.Module) -> int:
    """Weight bytes one token (batch 1) reads in ``mod`` (see the module docstring)."""
    if isinstance(mod, QSparseLinear):
        return mod.kept() * mod.out_features * mod.weight.element_size()
    if isinstance(mod, BitLinear):
        if mod.is_packed:
            rows = mod.kept() if mod.kept() is not None else mod.in_features
            return rows * packed_cols(mod.out_features)
        return mod.weight.numel() * mod.weight.element_size()
    if is_hf_bitnet(mod) or isinstance(mod, nn.Linear):
        return mod.weight.numel() * mod.weight.element_size()
    return 0


def _kept_rows(mod: nn.Module) -> int:
    if isinstance(mod, (QSparseLinear, BitLinear)):
        kept = mod.kept()
        return mod.in_features if kept is None else kept
    return mod.in_features


@dataclass(frozen=True)
class ConversionReport:
    """Summary of a conversion (``str(report)`` is the table ``convert(verbose=True)`` prints).

    Attributes:
        layers: ``{kind: count}`` of the model's linear layers after the conversion, e.g.
            ``{"QSparseLinear": 14, "nn.Linear (not converted)": 1}``.
        converted: how many layers this conversion replaced.
        kept_fraction: over the converted layers, the fraction of input features kept per token,
            weighted by layer size (``sum(k * out) / sum(in * out)``); 1.0 without sparsity.
        bytes_before, bytes_after: weight bytes one decoded token reads from all linear layers
            before and after (module docstring).
        names: ``{kind: [qualified names]}``, for a closer look.
        sibling_groups: the sibling layers linked to share one kernel call (``convert(fuse_siblings=True)``),
            e.g. ``"model.layers.0.self_attn.{q_proj,k_proj,v_proj}"``.
    """

    layers: dict[str, int]
    converted: int
    kept_fraction: float
    bytes_before: int
    bytes_after: int
    names: dict[str, list[str]] = field(default_factory=dict, repr=False)
    sibling_groups: tuple[str, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        lines = [f"qsparse_kernels.convert: {self.converted} layer(s) converted"]
        for kind, n in self.layers.items():
            some = ", ".join(self.names.get(kind, [])[:3])
            more = ", ..." if len(self.names.get(kind, [])) > 3 else ""
            lines.append(f"  {kind:<28} {n:>5}   {some}{more}")
        lines.append(f"  kept input features per token (converted layers): {self.kept_fraction:.1%}")
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        lines.append(
            f"  weight bytes read per token: {_mb(self.bytes_before)} -> {_mb(self.bytes_after)} ({ratio:.3f}x)"
        )
        if self.sibling_groups:
            more = ", ..." if len(self.sibling_groups) > 2 else ""
            lines.append(
                f"  sibling groups sharing one kernel call: {len(self.sibling_groups)}   "
                f"{', '.join(self.sibling_groups[:2])}{more}"
            )
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: module}`` of every linear-like module (each module once)."""
    return {name: m for name, m in model.named_modules() if layer_kind(m) is not None}


def build_report(
    before: int, model: nn.Module, converted: dict[str, nn.Module], sibling_groups=()
) -> ConversionReport:
    """The report for ``model`` after a conversion that replaced ``converted`` (``{name: new module}``)
    and linked ``sibling_groups``; ``before`` is the weight bytes per token measured on the model before it."""
    layers = linear_layers(model)
    kinds: Counter = Counter()
    names: dict[str, list[str]] = {}
    for name, m in layers.items():
        kind = layer_kind(m)
        kinds[kind] += 1
        names.setdefault(kind, []).append(name)
    kept = sum(_kept_rows(m) * m.out_features for m in converted.values())
    total = sum(m.in_features * m.out_features for m in converted.values())
    return ConversionReport(
        layers=dict(kinds),
        converted=len(converted),
        kept_fraction=kept / total if total else 1.0,
        bytes_before=before,
        bytes_after=sum(weight_bytes_per_token(m) for m in layers.values()),
        names=names,
        sibling_groups=tuple(sibling_groups),
    )


__all__ = ["ConversionReport", "weight_bytes_per_token", "layer_kind", "linear_layers"]
