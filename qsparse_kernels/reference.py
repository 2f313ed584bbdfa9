"""The reference backend: the readable oracle that defines every op (docs/SPEC.md).

Pure PyTorch, every device. Each function has the signature of the op it defines (without the
``backend`` argument) and assumes its arguments were already checked by ``_validate``.
Fast backends are tested against these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import BITS_PER_CODE, CODE_MASK, CODE_OFFSET, CODES_PER_BYTE, INVALID_CODE, PAD_CODE, packed_cols

# Every NaN, whatever its payload, gets this one key (the float32 quiet NaN's bits): all NaNs tie,
# so the lowest index wins among them (SPEC 1). Its low 16 bits are 0, as for every bf16 / fp16 key.
NAN_KEY = 0x7FC00000
INF_KEY = 0x7F800000


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` as int64 keys whose order is the magnitude order with NaN above +Inf (SPEC 1):
    the float32 bit pattern with the sign cleared (exact for bf16 and fp16 too), every NaN
    mapped to :data:`NAN_KEY`."""
    keys = (x.float().view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
    return torch.where(keys > INF_KEY, NAN_KEY, keys)


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest-magnitude entries of each row of ``x [..., d]``; zero (+0) the rest.

    NaN ranks above +-Inf. Among equal magnitudes, and among NaNs of any payload, the lowest
    indices are kept (SPEC 1), so every backend agrees exactly.
    """
    d = x.shape[-1]
    if k == 0 or x.numel() == 0:  # nothing to select: no O(d) index for an input without rows
        return torch.zeros_like(x)
    if k >= d:
        return x.clone()
    # One exact selection on (magnitude, -index): larger magnitude first, then lower index.
    index = torch.arange(d, device=x.device, dtype=torch.int64)
    composite = (magnitude_keys(x) << 32) | ((1 << 32) - 1 - index)
    idx = composite.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def block_topk_sparsify(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M sparsity: in every contiguous block of ``m`` along the last dim keep the ``n`` largest |x|."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // m, m)
    return topk_sparsify(blocks, n).reshape(shape)


def sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, k: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(topk_sparsify(x, k), weight, bias)``, accumulated in float32, cast to ``x.dtype``."""
    if math.prod(x.shape[:-1]) == 0:  # no rows: no float32 copy of the weight
        return x.new_empty((*x.shape[:-1], weight.shape[0]))
    xs = topk_sparsify(x, k)
    b = None if bias is None else bias.float()
    return F.linear(xs.float(), weight.float(), b).to(x.dtype)


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantization (BitNet b1.58 ``ActQuant``), computed in float32.

    Returns ``x_q`` (int8, shape of ``x``) and ``x_scale`` (float32, ``[..., 1]``) with
    ``x ~= x_q * x_scale``. In a row holding NaN or +-Inf, ``x_scale`` is NaN or Inf and every
    ``x_q`` whose product is not finite is 0 (the published quantizer leaves it undefined).
    """
    xf = x.float()
    a = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) if x.shape[-1] else xf.new_full((*x.shape[:-1], 1), 1e-5)
    # The published ActQuant writes `127.0 / a`, which PyTorch evaluates as `a.reciprocal() * 127`
    # (two float32 roundings, not one IEEE division): kernels must do the same to be bit-exact.
    q = (xf * (a.reciprocal() * 127.0)).round()
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q)).clamp(-128, 127).to(torch.int8)
    return q, a / 127.0


def ternarize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 ``WeightQuant`` before packing: ``(t [out, in] int8, scale float32 [])``."""
    wf = weight.float()
    g = wf.abs().mean().clamp(min=1e-5) if wf.numel() else wf.new_tensor(1e-5)
    t = (wf * (1.0 / g)).round().clamp(-1, 1).to(torch.int8)
    return t, g


def quantize_weight_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantization, packed: ``(packed uint8 [in, ceil(out/4)], scale float32 [])``."""
    t, g = ternarize_weight(weight)
    return pack_ternary(t), g


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack ``t [out, in]`` (int8 in {-1, 0, 1}) into the canonical layout ``uint8 [in, ceil(out/4)]``."""
    if bool(((t < -1) | (t > 1)).any()):
        raise ValueError("qsparse_kernels.pack_ternary: t must hold only -1, 0 and 1")
    out_f, in_f = t.shape
    cols = packed_cols(out_f)
    codes = torch.full((in_f, cols * CODES_PER_BYTE), PAD_CODE, dtype=torch.uint8, device=t.device)
    codes[:, :out_f] = (t.t().to(torch.int16) + CODE_OFFSET).to(torch.uint8)
    codes = codes.view(in_f, cols, CODES_PER_BYTE)
    packed = torch.zeros((in_f, cols), dtype=torch.uint8, device=t.device)
    for j in range(CODES_PER_BYTE):
        packed |= codes[..., j] << (BITS_PER_CODE * j)
    return packed


def unpack_codes(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The raw codes of a packed weight, ``uint8 [in, out_features]`` (0, 1, 2; 3 if invalid)."""
    shifts = torch.arange(0, CODES_PER_BYTE * BITS_PER_CODE, BITS_PER_CODE, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & CODE_MASK
    return codes.reshape(packed.shape[0], packed.shape[1] * CODES_PER_BYTE)[:, :out_features]


def unpack_ternary(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``uint8 [in, ceil(out/4)]`` -> ``int8 [out, in]``."""
    codes = unpack_codes(packed, out_features)
    if bool((codes == INVALID_CODE).any()):
        raise ValueError("qsparse_kernels.unpack_ternary: packed holds the invalid code 3")
    return (codes.to(torch.int8) - CODE_OFFSET).t().contiguous()


def ternary_accumulate(x_q: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Exact ``x_q [M, d] @ t^T`` as int32 ``[M, out]`` (float64 is exact for these magnitudes)."""
    t = unpack_codes(packed, out_features).to(torch.float64) - CODE_OFFSET  # [in, out]
    return (x_q.to(torch.float64) @ t).to(torch.int32)


def ternary_epilogue(
    acc: torch.Tensor, x_scale: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``acc * x_scale * scale (+ bias)`` in float32, NaN in rows whose kept entries were not finite."""
    y = acc.float() * x_scale * scale.reshape(())
    if bias is not None:
        y = y + bias.float()
    y = torch.where(torch.isfinite(x_scale), y, torch.full_like(y, float("nan")))
    return y.to(dtype)


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    out_features: int,
    k: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W1.58A8 linear: optional top-K, int8 absmax activations, exact int32 ternary matmul, rescale."""
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if rows == 0:  # no rows: the weight is not unpacked
        return x.new_empty((*lead, out_features))
    xs = x if k is None else topk_sparsify(x, k)
    x_q, x_scale = quantize_act_int8(xs)
    acc = ternary_accumulate(x_q.reshape(rows, x.shape[-1]), packed, out_features)
    y = ternary_epilogue(acc, x_scale.reshape(rows, 1), scale, bias, x.dtype)
    return y.reshape(*lead, out_features)
