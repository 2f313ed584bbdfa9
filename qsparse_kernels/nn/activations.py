"""Squared ReLU, the FFN activation of Q-Sparse (SPEC "Autograd")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def relu2(x: Tensor) -> Tensor:
    """``relu(x) ** 2``, elementwise; any shape and float dtype."""
    return torch.square(F.relu(x))


class ReLU2(nn.Module):
    """Squared ReLU module: ``relu(x) ** 2``. Shapes: any -> same. Sparse by construction (every
    negative input gives an exact zero), which is why Q-Sparse's FFN uses it."""

    def forward(self, x: Tensor) -> Tensor:
        return relu2(x)
