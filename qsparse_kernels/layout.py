"""The canonical packed ternary layout (SPEC 6): the one place that defines it.

A ternary weight ``t`` of logical shape ``[out_features, in_features]`` with values in
``{-1, 0, 1}`` is stored as ``uint8`` of shape ``[in_features, ceil(out_features / 4)]``.
Row ``i`` holds input feature ``i`` (so activation sparsity skips whole contiguous rows).
Output ``j`` of row ``i`` sits in byte ``[i, j // 4]`` at bits ``2*(j % 4)`` and
``2*(j % 4) + 1`` as the code ``c = t + 1`` in ``{0, 1, 2}``. Padding codes are 1 (zero);
code 3 is invalid.
"""

from __future__ import annotations

CODES_PER_BYTE = 4
BITS_PER_CODE = 2
CODE_OFFSET = 1  # code = t + CODE_OFFSET
PAD_CODE = 1  # the code of t == 0
INVALID_CODE = 3
CODE_MASK = (1 << BITS_PER_CODE) - 1


def packed_cols(out_features: int) -> int:
    """Bytes per packed row: ``ceil(out_features / 4)``."""
    return (out_features + CODES_PER_BYTE - 1) // CODES_PER_BYTE


def packed_shape(in_features: int, out_features: int) -> tuple[int, int]:
    """Shape of the canonical packed weight: ``(in_features, ceil(out_features / 4))``."""
    return (in_features, packed_cols(out_features))
