"""Per-row absmax int8 activation quantization (SPEC op 4), bit-exact with the reference.

The float32 recipe of :func:`qsparse_kernels.reference.quantize_act_int8`, op by op:

* ``a = clamp(max|x|, min=1e-5)``: a max over *magnitude keys* (the float32 bits of ``x`` with the
  sign cleared, compared as int32): that order is the float order for finite values and puts NaN
  above +Inf, so a row holding NaN gets ``a = NaN`` exactly as ``torch.amax`` propagates it
  (``tl.max`` on floats would drop NaN on CUDA). The clamp is a max of keys too, so NaN survives it.
* ``s = rn(rn(1 / a) * 127)``: PyTorch evaluates ``127.0 / a`` as reciprocal-then-multiply. The
  reciprocal must be an IEEE division: ``tl.math.div_rn`` (``/`` on fp32 compiles to the
  approximate ``div.full.f32`` on NVIDIA GPUs).
* ``q = clamp(round_half_even(rn(x * s)), -128, 127)``, 0 where ``x * s`` is not finite. The
  rounding uses only truncation and comparisons (see :func:`round_half_even_i32`), so it is exact
  whether or not the compiler contracts multiplies and adds into FMAs (Triton does by default,
  and ``(y + 1.5*2**23) - 1.5*2**23`` would then round the unrounded product ``x * s``).
* ``x_scale = rn(a / 127)`` (IEEE division again).
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from . import _compat
from ._compat import wrap
from .autotune import row_block

# The float32 nearest to 1e-5 as a magnitude key (torch's clamp(min=1e-5) on float32 uses it).
KEY_MIN_ABSMAX = struct.unpack("<i", struct.pack("<f", 1e-5))[0]


@triton.jit
def to_f32(x):
    """``x`` widened to float32, exactly. bfloat16 goes through its bits (the upper half of the
    float32): the same shift the GPU does, and exact in Triton's interpreter, which converts
    bfloat16 subnormals wrongly."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def mag_key(x):
    """|x| as int32 keys ordered like magnitudes: float32 bits with the sign cleared (NaN > +Inf)."""
    return to_f32(x).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def act_scales(max_key, KEY_MIN: tl.constexpr):
    """From the row's largest magnitude key: ``(s, x_scale)`` = ``(127 / a, a / 127)`` as torch rounds them."""
    a = tl.maximum(max_key, KEY_MIN).to(tl.float32, bitcast=True)  # clamp(min=1e-5), NaN kept
    s = tl.math.div_rn(tl.full(a.shape, 1.0, tl.float32), a) * 127.0
    x_scale = tl.math.div_rn(a, tl.full(a.shape, 127.0, tl.float32))
    return s, x_scale


@triton.jit
def round_half_even_i32(y):
    """``clamp(round_half_even(y), -128, 127)`` as int32; 0 where ``y`` is NaN or +-Inf.

    Only truncation and comparisons touch ``y``, never an add, so FMA contraction of the caller's
    ``x * s`` cannot change the result.
    """
    ay = tl.abs(y)
    ay = tl.where(ay < float("inf"), tl.minimum(ay, 256.0), 0.0)  # NaN compares false -> 0
    t = ay.to(tl.int32)  # truncation == floor, ay >= 0
    half = t.to(tl.float32) + 0.5  # exact for |t| <= 256
    up = (ay > half) | ((ay == half) & ((t & 1) == 1))
    r = t + up.to(tl.int32)
    r = tl.where(y < 0, -r, r)
    return tl.minimum(tl.maximum(r, -128), 127)


@triton.jit
def _quantize_kernel(
    x_ptr, stride_xm, stride_xd,  # x [M, d]
    q_ptr, stride_qm,  # x_q [M, d] int8, unit stride along d
    scale_ptr,  # x_scale [M] float32
    d,
    KEY_MIN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: pass 1 finds max |x| (as a key), pass 2 writes the int8 codes."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK)
    mx = tl.full([BLOCK], 0, tl.int32)
    for start in range(0, d, BLOCK):
        o = start + offs
        x = tl.load(x_row + o * stride_xd, mask=o < d, other=0.0)
        mx = tl.maximum(mx, mag_key(x))
    s, x_scale = act_scales(tl.max(mx, axis=0), KEY_MIN)
    for start in range(0, d, BLOCK):
        o = start + offs
        x = tl.load(x_row + o * stride_xd, mask=o < d, other=0.0)
        q = round_half_even_i32(to_f32(x) * s)
        tl.store(q_ptr + row * stride_qm + o, q.to(tl.int8), mask=o < d)
    tl.store(scale_ptr + row, x_scale)


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2 [M, d]`` (any strides, d >= 1) -> ``(x_q int8 [M, d] contiguous, x_scale float32 [M])``."""
    m, d = x2.shape
    q = _compat.empty((m, d), torch.int8, x2.device)
    scale = _compat.empty((m,), torch.float32, x2.device)
    if m:
        block, warps = row_block(d)
        wrap(_quantize_kernel)[(m,)](
            x2, x2.stride(0), x2.stride(1), q, q.stride(0), scale, d,
            KEY_MIN=KEY_MIN_ABSMAX, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return q, scale


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC op 4. ``x [..., d]`` float -> ``(x_q int8 [..., d], x_scale float32 [..., 1])``."""
    lead, d = x.shape[:-1], x.shape[-1]
    if d == 0:
        return _compat.empty(x.shape, torch.int8, x.device), torch.full(
            (*lead, 1), 1e-5, dtype=torch.float32, device=x.device
        ).div_(127.0)
    q, scale = quantize_rows(x.reshape(math.prod(x.shape[:-1]), d))
    return q.reshape(x.shape), scale.reshape(*lead, 1)
