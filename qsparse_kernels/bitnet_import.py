"""Hugging Face BitNet checkpoints into this library's packed ``BitLinear``, without float weights.

Models whose ``config.json`` has ``quantization_config.quant_method == "bitnet"`` load in
transformers (``from_pretrained``, which needs ``accelerate``) with its own layers from
``transformers.integrations.bitnet``; :func:`qsparse_kernels.convert` turns each of them into a
:class:`~qsparse_kernels.nn.BitLinear` (packed, SPEC 6) that runs ``ternary_linear``, with the
config's ``sparsity`` / ``k`` / ``backend`` (Q-Sparse on top of BitNet):

* ``BitLinear`` (``linear_class="bitlinear"``): ``weight`` uint8 ``[out / 4, in]`` with output row
  ``q * (out / 4) + p`` in byte row ``p`` at bits ``2q, 2q + 1`` (code ``t + 1``) and
  ``weight_scale`` ``[1]`` holding ``1 / mean|W|``; its forward is
  ``(x_q @ t^T) / (weight_scale * 127 / absmax)``, so ``scale = 1 / weight_scale`` (float32).
  The codes are moved into SPEC 6's ``[in, ceil(out / 4)]`` layout as integers.
* ``AutoBitLinear``, offline: ``weight`` float ``[out, in]`` holding ``t`` (transformers unpacked
  it at load) and ``weight_scale`` ``= mean|W|``; forward ``(ActQuant(x) @ t^T + bias) * weight_scale``,
  so ``scale = weight_scale`` and the bias becomes ``bias * weight_scale``.
* ``AutoBitLinear``, online (``quantization_mode="online"``): a float master weight quantized on
  the fly, which is this library's training-mode ``BitLinear`` (it shares the Parameter; packed
  with ``pack=True``).

The activation quantizer of these layers is SPEC 4 (``127 / absmax`` is ``reciprocal * 127`` in
PyTorch), so in float32, where both integer accumulators are exact, only the epilogue's rounding
differs: about 1e-7 relative. Layers built with ``use_rms_norm=True`` (an RMSNorm inside the
linear layer) are refused: this library's layers have none.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .layout import BITS_PER_CODE, CODE_MASK, CODE_OFFSET, CODES_PER_BYTE, INVALID_CODE
from .nn import BitLinear

HF_MODULE = "transformers.integrations.bitnet"
HF_CLASSES = ("BitLinear", "AutoBitLinear")


def is_hf_bitnet(mod: nn.Module) -> bool:
    """True for transformers' BitNet layers (``BitLinear``, ``AutoBitLinear``); imports nothing."""
    cls = type(mod)
    return cls.__module__ == HF_MODULE and cls.__name__ in HF_CLASSES


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"qsparse_kernels.convert: BitNet layer {name!r}: {msg}")


def hf_codes_to_ternary(weight: torch.Tensor, out_features: int, name: str = "?") -> torch.Tensor:
    """transformers' packed ``uint8 [out / 4, in]`` -> int8 ``t [out, in]`` in ``{-1, 0, 1}``.

    Integer work only (1 byte per weight, transient). Raises ``ValueError`` for a code 3 or a
    shape that does not hold ``out_features`` rows.
    """
    if weight.dtype != torch.uint8 or weight.dim() != 2:
        raise _err(
            name, f"weight must be uint8 [out_features / 4, in_features], got {weight.dtype} {list(weight.shape)}"
        )
    rows = weight.shape[0]
    if rows * CODES_PER_BYTE != out_features:
        raise _err(
            name,
            f"weight has {rows} packed rows, which hold {rows * CODES_PER_BYTE} outputs, but out_features = "
            f"{out_features} (transformers' format needs out_features divisible by 4)",
        )
    codes = torch.cat([(weight >> (BITS_PER_CODE * q)) & CODE_MASK for q in range(CODES_PER_BYTE)])  # [out, in]
    if bool((codes == INVALID_CODE).any()):
        raise _err(name, "weight holds the invalid ternary code 3 (codes are t + 1 in {0, 1, 2})")
    return codes.view(torch.int8) - CODE_OFFSET


def _float_ternary(weight: torch.Tensor, name: str) -> torch.Tensor:
    """An unpacked ``AutoBitLinear`` weight (float, values in ``{-1, 0, 1}``) as int8."""
    t = weight.detach().to(torch.int8)
    if not torch.equal(t.to(weight.dtype), weight.detach()) or bool((t.abs() > 1).any()):
        raise _err(name, "the offline AutoBitLinear weight must hold only -1, 0 and 1 (the unpacked ternary codes)")
    return t


def _scale(value: torch.Tensor, name: str, invert: bool) -> torch.Tensor:
    if value.numel() != 1:
        raise _err(name, f"weight_scale must hold one value, got shape {list(value.shape)}")
    v = value.detach().reshape(()).to(torch.float32)
    scale = 1.0 / v if invert else v
    if not bool(torch.isfinite(scale)) or float(scale) <= 0.0:
        raise _err(name, f"weight_scale must be finite and > 0, got {float(value.reshape(-1)[0])}")
    return scale


def from_hf_bitnet(mod: nn.Module, name: str, sparsity: float | None, k: int | None, backend: str, pack: bool):
    """This library's ``BitLinear`` for one transformers BitNet layer (see the module docstring).

    ``pack`` applies to an online ``AutoBitLinear`` only (the others are packed already).
    Shapes: ``[..., in_features] -> [..., out_features]``, as the layer it replaces.
    """
    if getattr(mod, "rms_norm", None) is not None:
        raise _err(name, "use_rms_norm=True (an RMSNorm inside the linear layer) is not supported")
    cls = type(mod).__name__
    if cls == "AutoBitLinear" and getattr(mod, "online_quant", False):
        new = BitLinear.from_linear(mod, sparsity=sparsity, k=k, backend=backend)
        return new.pack() if pack else new
    out_features, in_features = mod.out_features, mod.in_features
    bias = mod.bias
    if cls == "BitLinear":
        t = hf_codes_to_ternary(mod.weight, out_features, name)
        scale = _scale(mod.weight_scale, name, invert=True)
    else:
        t = _float_ternary(mod.weight, name)
        scale = _scale(mod.weight_scale, name, invert=False)
        if bias is not None:
            bias = bias.detach() * mod.weight_scale.detach().reshape(()).to(bias.dtype)
    dtype = bias.dtype if bias is not None else None
    new = BitLinear(
        in_features,
        out_features,
        bias=bias is not None,
        sparsity=sparsity,
        k=k,
        backend=backend,
        device="meta",
        dtype=dtype,
    )
    new._to_packed_mode()
    new.packed = ops.pack_ternary(t, backend=backend)
    new.scale = scale
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new


__all__ = ["is_hf_bitnet", "from_hf_bitnet", "hf_codes_to_ternary"]
