"""``ReLU2GLU``: the Q-Sparse feed-forward block, ``down(up(x) * relu(gate(x)) ** 2)``."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .activations import relu2
from .bitlinear import BitLinear
from .linear import QSparseLinear

_PROJS = ("gate", "up", "down")


def _per_projection(sparsity) -> dict[str, float | None]:
    if isinstance(sparsity, Mapping):
        unknown = set(sparsity) - set(_PROJS)
        missing = set(_PROJS) - set(sparsity)
        if unknown or missing:
            raise ValueError(
                f"qsparse_kernels.ReLU2GLU: a sparsity mapping needs exactly the keys {_PROJS}, "
                f"got {sorted(sparsity)}"
            )
        return {p: sparsity[p] for p in _PROJS}
    return dict.fromkeys(_PROJS, sparsity)


class ReLU2GLU(nn.Module):
    """Q-Sparse FFN: ``down_proj(up_proj(x) * relu(gate_proj(x)) ** 2)``.

    Every projection is a Q-Sparse layer: :class:`QSparseLinear`, or :class:`BitLinear` when
    ``ternary``. Attribute names follow Llama (``gate_proj``, ``up_proj``, ``down_proj``).

    Args:
        d_model, d_ff: model and hidden widths (``gate``/``up``: ``d_model -> d_ff``; ``down``:
            ``d_ff -> d_model``).
        bias: biases on the three projections.
        sparsity: one float in ``[0, 1)`` for all three, or ``{"gate": s, "up": s, "down": s}``
            (the paper sparsifies ``down`` more, its input being ReLU²-sparse already).
        ternary: BitNet b1.58 projections (``BitLinear``); ``sparsity=None`` is then dense.
        backend, device, dtype: passed to every projection.

    Shapes: ``x [..., d_model]`` -> ``[..., d_model]``.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        bias: bool = False,
        sparsity: float | Mapping[str, float] | None = 0.5,
        ternary: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        s = _per_projection(sparsity)
        layer = BitLinear if ternary else QSparseLinear
        kw = {"bias": bias, "backend": backend, "device": device, "dtype": dtype}
        self.gate_proj = layer(d_model, d_ff, sparsity=s["gate"], **kw)
        self.up_proj = layer(d_model, d_ff, sparsity=s["up"], **kw)
        self.down_proj = layer(d_ff, d_model, sparsity=s["down"], **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.up_proj(x) * relu2(self.gate_proj(x)))
