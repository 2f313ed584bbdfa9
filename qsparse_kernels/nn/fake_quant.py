"""BitNet b1.58 fake quantization for training (SPEC 4, 5 and "Autograd"): quantize then dequantize.

Both functions return the dequantized values only (no gradient); a module applies them with the
straight-through estimator ``x + (fake_quant(x) - x).detach()``. In float32 they are bit-exact with
the published BitNet b1.58 quantizers (HF ``ActQuant`` / ``WeightQuant``)::

    s = 127 / clamp(max|x|, 1e-5);  round(x * s).clamp(-128, 127) / s     # per row
    s = 1 / clamp(mean|w|, 1e-5);   round(w * s).clamp(-1, 1) / s          # per tensor

Other dtypes are computed in float32 and rounded to the input dtype once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops


@torch.no_grad()
def fake_quant_act(x: Tensor, backend: str = "auto") -> Tensor:
    """Per-row absmax int8 quantize-dequantize of ``x [..., d]``; same shape and dtype.

    The int8 codes come from :func:`qsparse_kernels.quantize_act_int8` (the inference quantizer);
    they are divided by ``s = 127 / clamp(max|x|, 1e-5)`` as the published formula does (not
    multiplied by ``x_scale = a / 127``, which rounds differently).
    """
    x_q, _ = ops.quantize_act_int8(x.detach(), backend=backend)
    s = 127.0 / x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x_q.float() / s).to(x.dtype)


@torch.no_grad()
def fake_quant_weight(w: Tensor) -> Tensor:
    """Per-tensor absmean ternary quantize-dequantize of ``w [out, in]``; same shape and dtype.

    Written out here rather than through :func:`qsparse_kernels.quantize_weight_ternary` because
    training needs the dequantized float weight every step, not the packed codes; the packed path
    (``BitLinear.pack``) uses the op, and the tests check that both give the same codes and scale.
    """
    wf = w.detach().float()
    s = 1.0 / wf.abs().mean().clamp(min=1e-5)
    return ((wf * s).round().clamp(-1, 1) / s).to(w.dtype)
