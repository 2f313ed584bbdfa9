"""``BitLinear``: BitNet b1.58 (ternary weights, int8 activations), optionally with Q-Sparse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate as check
from .. import ops
from ..backends import select
from ..layout import BITS_PER_CODE, CODE_MASK, CODES_PER_BYTE, INVALID_CODE, PAD_CODE, packed_shape
from . import _config as cfg
from . import _fastpath
from .fake_quant import fake_quant_act, fake_quant_weight


class BitLinear(nn.Module):
    """BitNet b1.58 linear layer with optional top-K activation sparsity.

    Two modes:

    * training (default): float master ``weight [out, in]`` (an ``nn.Linear``-style Parameter).
      Forward: ``xs = topk_sparsify(x, k)`` (when sparse, straight-through backward), then fake
      quantization with the straight-through estimator (SPEC "Autograd")::

          xq = xs + (ActQuant(xs) - xs).detach();  wq = w + (WeightQuant(w) - w).detach()
          y  = F.linear(xq, wq, bias)

      bit-exact in float32 with the published BitNet b1.58 formulas (see :mod:`.fake_quant`).
    * packed (after :meth:`pack`, or after loading a packed ``state_dict``): buffers ``packed``
      (uint8 ``[in, ceil(out/4)]``, SPEC 6) and ``scale`` (float32 ``[]``) replace ``weight``;
      forward is :func:`qsparse_kernels.ternary_linear` (exact int32 accumulation). Inference only.
      ``.to(dtype)`` leaves ``scale`` in float32.

    Both modes compute the same function. They differ by float32 rounding only: elementwise
    ``|y_train - y_packed| <= gamma(d + 10) * (|x_q| @ |t|^T * x_scale * scale + |bias|)`` with
    ``gamma(n) = n u / (1 - n u)``, ``u = 2**-24`` (fake quantization rounds the dequantized
    operands and their float sum; the packed path rounds only ``acc * x_scale * scale``).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear`` (bias defaults to False
            as in BitNet).
        sparsity: ``None`` (dense activations) or a float in ``[0, 1)``; ``k`` overrides it.
        backend: ``"auto"`` or a backend name, used for every op the layer calls.

    Shapes: ``x [..., in_features]`` -> ``[..., out_features]`` in ``x.dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        sparsity: float | None = None,
        k: int | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = cfg.backend_name("BitLinear", backend)
        self.sparsity, self.k = cfg.sparsity_or_k("BitLinear", in_features, sparsity, k, allow_dense=True)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation of the master weight (training mode only)."""
        if self.is_packed:
            raise RuntimeError("qsparse_kernels.BitLinear: reset_parameters needs the float weight (module is packed)")
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, sparsity: float | None = None, k: int | None = None, backend: str = "auto"
    ) -> BitLinear:
        """A ``BitLinear`` (training mode) sharing ``linear``'s ``weight`` and ``bias`` Parameters.
        A non-finite weight raises ``ValueError``."""
        check.finite_weight("BitLinear.from_linear", "linear.weight", linear.weight)
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            sparsity=sparsity,
            k=k,
            backend=backend,
            device="meta",
            dtype=linear.weight.dtype,
        )
        weight = linear.weight
        mod.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        mod.bias = linear.bias
        return mod

    @property
    def is_packed(self) -> bool:
        """True once the ternary weight is packed (inference mode)."""
        return "packed" in self._buffers

    def kept(self, d: int | None = None) -> int | None:
        """Kept entries per token for an input of last dim ``d`` (``None``: dense)."""
        return cfg.kept(self.sparsity, self.k, self.in_features if d is None else d)

    @torch.no_grad()
    def pack(self) -> BitLinear:
        """Quantize the master weight (:func:`qsparse_kernels.quantize_weight_ternary`) and switch to
        packed inference mode; the float weight is dropped. Idempotent; returns ``self``.
        A non-finite weight raises ``ValueError`` and leaves the module as it was."""
        if self.is_packed:
            return self
        check.finite_weight("BitLinear.pack", f"the weight of {self}", self.weight)
        packed, scale = ops.quantize_weight_ternary(self.weight.detach(), backend=self.backend)
        del self.weight
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        if self._siblings is not None:  # the last sibling packed: store them side by side (nn/_siblings.py)
            from ._siblings import store_side_by_side

            store_side_by_side(self._siblings.members)
        return self

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
        k = cfg.kept(self.sparsity, self.k, x.shape[-1])
        buffers = self._buffers  # what nn.Module.__getattr__ reads, without its ~0.8 us a lookup
        packed = buffers.get("packed")
        if packed is not None:
            x, bias = cfg.autocast_args(x, cfg.param(self, "bias"))
            scale, n = buffers["scale"], self.out_features
            y = ops.ternary_linear(x, packed, scale, n, k, bias, backend=self.backend)
            if bias is self._parameters.get("bias") and _fastpath.eager_plain():
                fn = select("ternary_linear", self.backend, x.device)[1]
                owned = ((buffers, "packed", packed), (buffers, "scale", scale), (self._parameters, "bias", bias))
                self.__dict__["_plan"] = _fastpath.plan(fn, (packed, scale, n, k, bias), x, n, self.backend, owned)
            return y
        xs = x if k is None else ops.topk_sparsify(x, k, backend=self.backend)
        xq = xs + (fake_quant_act(xs, self.backend) - xs).detach()
        w = self.weight
        wq = w + (fake_quant_weight(w) - w).detach()
        return F.linear(xq, wq, self.bias)

    def __getstate__(self) -> dict:  # pickle, deepcopy: a copy plans its own first call
        state = super().__getstate__()
        state.pop("_plan", None)
        return state

    def __setattr__(self, name: str, value) -> None:
        _fastpath.drop(self)  # training, sparsity, k, backend, ...: the plan depends on them
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        _fastpath.drop(self)
        # .to(dtype) / .half() must not round the float32 weight scale (ternary_linear needs it exact).
        scale = self._buffers.get("scale")
        super()._apply(fn, recurse)
        if scale is not None and self._buffers["scale"].dtype != torch.float32:
            self._buffers["scale"] = scale.to(device=self._buffers["scale"].device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Siblings stored side by side (nn/_siblings.py, store_side_by_side) hold column ranges of
        # one buffer; a checkpoint gets each as its own contiguous tensor (safetensors and
        # save_pretrained need that), a copy.
        key = prefix + "packed"
        packed = destination.get(key)
        if packed is not None and not packed.is_contiguous():
            destination[key] = packed.contiguous()

    # ---- loading: the state_dict decides the mode; packed weights are validated first ----
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        pk, sk, wk = prefix + "packed", prefix + "scale", prefix + "weight"
        if pk in state_dict or sk in state_dict:
            problem = self._packed_problem(state_dict, pk, sk)
            if problem is not None:
                errors.append(problem)
                return
            if not self.is_packed:
                self._to_packed_mode()
        elif wk in state_dict and self.is_packed:
            self._to_training_mode(state_dict[wk].dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def _packed_problem(self, state_dict, pk: str, sk: str) -> str | None:
        """Why ``state_dict[pk], state_dict[sk]`` is not a valid packed weight for this layer, or None."""
        if pk not in state_dict or sk not in state_dict:
            return f"packed BitLinear checkpoint needs both {pk!r} and {sk!r}"
        packed, scale = state_dict[pk], state_dict[sk]
        want = packed_shape(self.in_features, self.out_features)
        if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
            return f"{pk!r} must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}"
        if tuple(packed.shape) != want:
            return (
                f"{pk!r} has shape {list(packed.shape)}, but this layer ({self.in_features} -> {self.out_features}) "
                f"needs [in_features, ceil(out_features / 4)] = {list(want)}"
            )
        shifts = torch.arange(0, CODES_PER_BYTE * BITS_PER_CODE, BITS_PER_CODE, device=packed.device, dtype=torch.uint8)
        codes = ((packed.unsqueeze(-1) >> shifts) & CODE_MASK).reshape(packed.shape[0], -1)
        if bool((codes == INVALID_CODE).any()):
            return f"{pk!r} holds the invalid ternary code 3 (codes are t + 1 in {{0, 1, 2}})"
        if bool((codes[:, self.out_features :] != PAD_CODE).any()):
            return f"{pk!r} has padding codes other than {PAD_CODE} past out_features = {self.out_features}"
        if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.dim() != 0:
            got = f"{scale.dtype} of shape {list(scale.shape)}" if isinstance(scale, Tensor) else type(scale).__name__
            return f"{sk!r} must be a float32 scalar tensor (shape []), got {got}"
        v = float(scale)
        if not math.isfinite(v) or v <= 0.0:
            return f"{sk!r} must be finite and > 0, got {v}"
        return None

    def _to_packed_mode(self) -> None:
        device = self.weight.device
        del self.weight
        shape = packed_shape(self.in_features, self.out_features)
        self.register_buffer("packed", torch.empty(shape, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty((), dtype=torch.float32, device=device))

    def _to_training_mode(self, dtype: torch.dtype) -> None:
        device = self.packed.device
        del self.packed, self.scale
        self.weight = nn.Parameter(torch.empty((self.out_features, self.in_features), dtype=dtype, device=device))

    def config(self) -> dict:
        """The sparsity configuration (what a checkpoint must agree with)."""
        return {"type": "BitLinear", "sparsity": self.sparsity, "k": self.k, "block": None}

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
        s += f"k={self.k}" if self.k is not None else f"sparsity={self.sparsity}"
        return s + f", packed={self.is_packed}, backend={self.backend!r}"
