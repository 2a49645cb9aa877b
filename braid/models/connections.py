"""Residual connections around a block's sublayers.

A connection owns the pre-norm and decides how a sublayer's output re-enters the residual stream,
so richer schemes (hyper-connections) replace this module without touching mixers or FFNs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from braid.models.layers import RMSNorm


class PreNormResidual(nn.Module):
    """``h + f(norm(h))``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)

    def forward(self, h: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return h + sublayer(self.norm(h))
