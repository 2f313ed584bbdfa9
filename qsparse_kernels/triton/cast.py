"""Storing float32 results in the output dtype with round-to-nearest-even, everywhere.

On NVIDIA GPUs ``y.to(tl.bfloat16)`` is ``cvt.rn.bf16.f32`` (round to nearest even), but Triton's
interpreter converts float32 to bfloat16 by truncating the mantissa, which would make the
interpreter tests disagree with the reference by an ulp. The bfloat16 rounding is therefore done
here with integer operations (a handful per output, in the epilogue only), identical on both;
float16 and float32 use the plain conversion, which rounds to nearest even in both.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_rn(ptrs, y, mask):
    """``tl.store(ptrs, y.to(ptrs' element type), mask)`` with round-to-nearest-even, NaN kept."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        # Add just under half an ulp of bfloat16, plus 1 if the kept lsb is odd (ties to even);
        # carries into the exponent are the correct rounding up (to +-Inf at the top).
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)  # any NaN -> the canonical quiet NaN
        tl.store(ptrs, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)
