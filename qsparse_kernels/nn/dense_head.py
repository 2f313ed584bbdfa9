"""``DenseHead``: the model's dense output head, through the library's GEMV where that is faster."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _native, ops
from . import _config as cfg

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _max_rows() -> dict[torch.dtype, int]:
    """Rows up to which the CPU kernel takes a row-major weight at k = d, per dtype (dense_gemv.h)."""
    if not _native.loaded():
        return {}
    return {dt: int(_native._C.cpu_row_gemv_max_rows(str(dt).removeprefix("torch."))) for dt in _FLOATS}


_MAX_ROWS = _max_rows()


class DenseHead(nn.Linear):
    """A dense ``nn.Linear`` (the model's output head) whose CPU inference runs the library's GEMV.

    The head stays dense (no top-K: quality) and keeps ``nn.Linear``'s row-major weight, so the
    parameters, ``state_dict`` keys and weight tying (``lm_head.weight is embed_tokens.weight``)
    are those of the ``nn.Linear`` it replaces. :func:`qsparse_kernels.convert` makes one from the
    output head (``fast_head=True``, the default); :func:`qsparse_kernels.unconvert` turns it back.

    Shapes: ``x [..., in_features]`` -> ``[..., out_features]`` in ``x.dtype``.

    Dispatch: on the CPU, without autograd, for at most 4 rows (2 in bfloat16 on a CPU with
    AMX-BF16, where torch's GEMM runs on tiles from 3 rows) (decode, small batches, and the last
    position a generation prefill keeps), and for every row count in a 16-bit dtype whose torch
    GEMM is slow on this CPU (no AVX512-BF16 / AVX512-FP16), with the weight's dtype:
    ``sparse_linear(x, weight, k=in_features, bias)``, whose kernel reads each weight row once for
    up to 4 rows (csrc/cpu/dense_gemv.cpp; on a TinyLlama head ~1.4x the read rate of torch's bf16
    GEMV on Sapphire Rapids, 1.8x on Zen 4; dense_gemv.h has the measured row limits). Everything else
    (more rows, training, other devices) is ``F.linear``, exactly as ``nn.Linear``.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DenseHead:
        """A ``DenseHead`` sharing ``linear``'s ``weight`` and ``bias`` Parameters (no copy, layout unchanged)."""
        head = cls(linear.in_features, linear.out_features, bias=False, device="meta", dtype=linear.weight.dtype)
        head.weight = linear.weight
        head.bias = linear.bias
        return head.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        x, weight, bias = cfg.autocast_args(x, self.weight, self.bias)
        if _fast(x, weight, bias):
            return ops.sparse_linear(x, weight, self.in_features, bias, backend="cpu")
        return F.linear(x, weight, bias)


def _fast(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype not in _FLOATS or weight.dtype != x.dtype:
        return False
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1] or weight.stride(-1) != 1:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return 0 < rows <= _MAX_ROWS.get(x.dtype, 0)
