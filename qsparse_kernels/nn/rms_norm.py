"""``RMSNorm``: Hugging Face Llama's RMSNorm whose CPU inference is one kernel call.

Once a model's projections are sparse or ternary, its small ops are a visible share of a decoded
token: HF's ``LlamaRMSNorm`` runs as ~9 torch ops (~18 us a call on a 2048-wide bf16 row, Zen 4,
torch 2.14), 45 calls a TinyLlama token. :class:`RMSNorm` computes the same function in one call of
``csrc/cpu/rms_norm.cpp`` (~2 us).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _native
from .._ops import direct_ok

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL = _native.loaded()

#: The transformers RMSNorm classes that compute exactly :func:`reference` (checked against their
#: source and, in tests/test_rms_norm.py, against their outputs): ``convert(fast_norm=True)`` swaps
#: only these. Not here, on purpose: Gemma's (``1 + weight``, scaled in float32) and OLMo-2's (scaled
#: before the cast back).
LLAMA_STYLE = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
    "Qwen3MoeRMSNorm", "Phi3RMSNorm", "GraniteRMSNorm",
})


def reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF ``LlamaRMSNorm.forward``, op for op: ``x [..., d]``, ``weight [d]`` -> ``[..., d]`` in
    ``torch.promote_types(weight.dtype, x.dtype)``. Normalised in float32, rounded to ``x.dtype``,
    then scaled by ``weight``."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    """Drop-in for Hugging Face's ``LlamaRMSNorm`` (and the classes in :data:`LLAMA_STYLE`).

    Shapes: ``x [..., hidden_size]`` -> ``[..., hidden_size]``. Parameters and attributes are HF's:
    ``weight [hidden_size]`` (the same ``state_dict`` key) and ``variance_epsilon``.

    Dispatch: on the CPU, with ``weight`` of ``x``'s dtype (float32, bf16, fp16) and no autograd,
    the kernel ``qsparse::rms_norm_kernel``: the same roundings as :func:`reference`, the sum of
    squares in a fixed float32 order (csrc/cpu/rms_norm.cpp), so within float32 rounding of it
    (bf16 / fp16 results are almost always identical). Everything else (training, autograd, other
    devices, mixed dtypes) is :func:`reference` itself.

    :func:`qsparse_kernels.convert` swaps a model's Llama-style norms for it (``fast_norm=True``, the
    default; :func:`qsparse_kernels.convert.use_fast_norm`); :func:`qsparse_kernels.unconvert` turns
    them back.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        eps = float(eps)
        if not (eps >= 0 and eps != float("inf")):
            raise ValueError(f"RMSNorm: eps must be finite and >= 0, got {eps}")
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self._hf_class: type[nn.Module] | None = None

    @classmethod
    def from_module(cls, norm: nn.Module) -> RMSNorm:
        """An ``RMSNorm`` sharing ``norm``'s ``weight`` Parameter (no copy); ``norm`` is a module of a
        class in :data:`LLAMA_STYLE` (``TypeError`` otherwise). :meth:`to_module` gives it back."""
        if type(norm).__name__ not in LLAMA_STYLE:
            raise TypeError(f"RMSNorm.from_module: {type(norm).__name__} is not one of {sorted(LLAMA_STYLE)}")
        new = cls(norm.weight.shape[0], norm.variance_epsilon, device="meta", dtype=norm.weight.dtype)
        new.weight = norm.weight
        new._hf_class = type(norm)
        return new.train(norm.training)

    def to_module(self) -> nn.Module:
        """The module of the class this one replaced (same ``weight`` Parameter and mode)."""
        if self._hf_class is None:
            raise TypeError("RMSNorm.to_module: this RMSNorm was not made by from_module")
        with torch.device("meta"):
            norm = self._hf_class(self.weight.shape[0], eps=self.variance_epsilon)
        norm.weight = self.weight
        return norm.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        w, eps = self._parameters["weight"], self.variance_epsilon
        # The kernel's arguments, checked inline (in a helper function they cost ~1.4 us of a 5 us call).
        if (_KERNEL and x.is_cpu and w.is_cpu and x.dtype is w.dtype and x.dtype in _FLOATS and x.ndim
                and w.ndim == 1 and x.shape[-1] == w.shape[0]):
            if direct_ok(x, w):
                return _native._C.call_rms_norm(x, w, eps)
            if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
                return torch.ops.qsparse.rms_norm_kernel(x, w, eps)
        return reference(x, w, eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
