"""How closely a packed BitLinear agrees with its fake-quantized training mode (float32 rounding)."""

import torch

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from qsparse_kernels.nn import BitLinear


def _gamma(n: int) -> float:
    u = 2.0**-24
    return n * u / (1 - n * u)


def packed_error_bound(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |y_train - y_packed| for a packed ``layer`` on input ``x [M, d]``:
    ``gamma(d + 10) * (|x_q| @ |t|^T * x_scale * scale + |bias|)`` (float32 rounding of the
    dequantized operands and their sum vs. of the int32 epilogue)."""
    d = x.shape[-1]
    k = layer.kept(d)
    xs = x if k is None else R.topk_sparsify(x, k)
    x_q, x_scale = R.quantize_act_int8(xs)
    t = qk.unpack_ternary(layer.packed, layer.out_features).double()
    mag = (x_q.double().abs() @ t.abs().t()) * x_scale.double() * layer.scale.double()
    if layer.bias is not None:
        mag = mag + layer.bias.detach().double().abs()
    return _gamma(d + 10) * mag
