"""``QSparseLinear``: a drop-in ``nn.Linear`` whose input is top-K (or N:M) sparsified per token."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _validate as check
from .. import ops
from ..backends import select
from . import _config as cfg
from . import _fastpath


class QSparseLinear(nn.Module):
    """``y = F.linear(topk_sparsify(x, k), weight, bias)`` with a straight-through backward (Q-Sparse).

    Drop-in for :class:`torch.nn.Linear`: the same constructor head, attributes (``in_features``,
    ``out_features``), parameters (``weight [out, in]``, ``bias [out]``) and ``state_dict`` keys, so
    an ``nn.Linear`` checkpoint loads as is. The weight is stored in the fast column-major layout
    (``weight.stride(0) == 1``, :func:`qsparse_kernels.to_fast_layout`), also after
    ``load_state_dict`` and ``.to()``; the Parameter object never changes, so optimizers keep it.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        sparsity: fraction of input entries zeroed per token, in ``[0, 1)``; the kept count is
            ``sparsity_to_k(x.shape[-1], sparsity)``, computed per call. ``0`` is dense.
        k: fixed kept count (``0 <= k <= in_features``); overrides ``sparsity``.
        block: ``(n, m)`` for Block Q-Sparse: keep the ``n`` largest ``|x|`` in every contiguous
            block of ``m`` (``m`` must divide ``in_features``); overrides ``sparsity`` and ``k``.
        backend: ``"auto"`` (resolved per call, so ``use_backend`` applies) or a backend name.

    Shapes: ``x [..., in_features]`` -> ``[..., out_features]`` in ``x.dtype`` (float32, bfloat16
    or float16, the dtype of ``weight``; under ``torch.autocast`` both are cast to the autocast
    dtype first, as for ``nn.Linear``).

    Backward (SPEC "Autograd"): ``dx = g @ W`` for every entry of ``x``, masked or not;
    ``dW = g^T @ topk(x)``; ``db = sum(g)``. With ``block`` the same holds for the N:M mask.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        sparsity: float | None = 0.5,
        k: int | None = None,
        block: tuple[int, int] | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = cfg.backend_name("QSparseLinear", backend)
        self.block = cfg.block_nm("QSparseLinear", block, in_features)
        if self.block is not None:
            self.sparsity, self.k = 1.0 - self.block[0] / self.block[1], None
        else:
            self.sparsity, self.k = cfg.sparsity_or_k("QSparseLinear", in_features, sparsity, k)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((in_features, out_features), **factory).t())
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation (same values for the same RNG state), kept in the fast layout."""
        w = torch.empty(self.out_features, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        with torch.no_grad():
            self.weight.copy_(w)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sparsity: float | None = 0.5,
        k: int | None = None,
        block: tuple[int, int] | None = None,
        backend: str = "auto",
    ) -> QSparseLinear:
        """A ``QSparseLinear`` sharing ``linear``'s ``weight`` and ``bias`` Parameters (no second copy).

        The shared weight is moved into the fast layout in place (same Parameter object, so an
        optimizer built on ``linear`` keeps working); ``linear`` still computes the same function.
        A non-finite weight raises ``ValueError``.
        """
        check.finite_weight("QSparseLinear.from_linear", "linear.weight", linear.weight)
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            sparsity=sparsity,
            k=k,
            block=block,
            backend=backend,
            device="meta",
            dtype=linear.weight.dtype,
        )
        weight = linear.weight
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        cfg.relayout_(weight)
        mod.weight = weight
        mod.bias = linear.bias
        return mod

    def kept(self, d: int | None = None) -> int:
        """Kept entries per token for an input of last dim ``d`` (default ``in_features``)."""
        d = self.in_features if d is None else d
        if self.block is not None:
            return d // self.block[1] * self.block[0]
        return cfg.kept(self.sparsity, self.k, d)

    # A SiblingGroup (nn/_siblings.py) when convert() linked this layer with siblings reading the same input.
    _siblings = None

    # The last direct call, remembered (nn/_fastpath.py); dropped when an attribute is set.
    _plan = None

    def forward(self, x: Tensor) -> Tensor:
        if self._siblings is not None:
            y = self._siblings.output(self, x)
            if y is not None:
                return y
        plan = self._plan
        if plan is not None and plan.matches(x):
            return plan.fn(x, *plan.args)
        x, weight, bias = cfg.autocast_args(x, cfg.param(self, "weight"), cfg.param(self, "bias"))
        if self.block is not None:
            # The N:M-sparsified x has at most kept() nonzeros per token, so sparse_linear's top-K
            # keeps all of them and its kernel reads only their weight rows (F.linear on the
            # column-major weight would read every row, and is ~50x slower than dense in fp16).
            x = ops.block_topk_sparsify(x, *self.block, backend=self.backend)
            return ops.sparse_linear(x, weight, self.kept(x.shape[-1]), bias, backend=self.backend)
        k = self.kept(x.shape[-1])
        y = ops.sparse_linear(x, weight, k, bias, backend=self.backend)
        params = self._parameters
        if weight is params.get("weight") and bias is params.get("bias") and _fastpath.eager_plain():
            fn = select("sparse_linear", self.backend, x.device)[1]
            owned = ((params, "weight", weight), (params, "bias", bias))
            self.__dict__["_plan"] = _fastpath.plan(fn, (weight, k, bias), x, self.out_features, self.backend, owned)
        return y

    # Keep the fast layout whatever loads or converts the weight.
    def _load_from_state_dict(self, *args, **kwargs) -> None:
        _fastpath.drop(self)
        super()._load_from_state_dict(*args, **kwargs)
        cfg.relayout_(self.weight)

    def __getstate__(self) -> dict:  # pickle, deepcopy: a copy plans its own first call
        state = super().__getstate__()
        state.pop("_plan", None)
        return state

    def __setattr__(self, name: str, value) -> None:
        _fastpath.drop(self)  # training, sparsity, k, block, backend, ...: the plan depends on them
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        _fastpath.drop(self)
        super()._apply(fn, recurse)
        cfg.relayout_(self.weight)
        return self

    def config(self) -> dict:
        """The sparsity configuration (what a checkpoint must agree with)."""
        return {"type": "QSparseLinear", "sparsity": self.sparsity, "k": self.k, "block": self.block}

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
        if self.block is not None:
            s += f"block={self.block}"
        elif self.k is not None:
            s += f"k={self.k}"
        else:
            s += f"sparsity={self.sparsity}"
        return s + f", backend={self.backend!r}"
