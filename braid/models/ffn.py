"""Feed-forward blocks."""

from __future__ import annotations

import torch
import torch.nn as nn

from braid.config import ModelConfig
from braid.kernels.fused import swiglu
from braid.models.layers import mark_output_projection
from braid.models.registry import register_ffn
from braid.models.tp_plan import Split, TPPlan


def ffn_hidden_size(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden is not None:
        return cfg.ffn_hidden
    hidden = int(8 * cfg.d_model / 3)  # keeps SwiGLU's parameters equal to a 4·d GELU MLP
    return -(-hidden // cfg.ffn_multiple) * cfg.ffn_multiple


@register_ffn("S")
class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down_proj = mark_output_projection(nn.Linear(hidden, cfg.d_model, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # Triton on CUDA (kernels.fused)

    def flops_per_token(self, seq_len: int) -> float:
        return 2 * 3 * self.gate_proj.in_features * self.gate_proj.out_features

    def tp_plan(self, tp: int) -> TPPlan:
        """Gate/up split by hidden units (rows), down by its input columns."""
        return TPPlan(params={"gate_proj.weight": Split(0), "up_proj.weight": Split(0), "down_proj.weight": Split(1)},
                      checks=((self.gate_proj.out_features, "model.ffn_hidden"),))


@register_ffn("-")
class NoFFN(nn.Module):
    """A layer with a mixer only (Megatron's hybrid patterns have such layers)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
