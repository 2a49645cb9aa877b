"""Gated attention (Qiu et al., "G1"): softmax attention whose output is multiplied by a sigmoid gate
computed from the same normalised input, before the output projection.

Gate layout: the gate logits come from a widened q projection. Its output is laid out per KV group,
``[B, T, Hkv, G·D | G·E]`` with ``G = H / Hkv`` query heads per group and ``E`` = 1 (headwise: one
gate per head) or D (elementwise: one gate per channel). Within a group the first ``G·D`` channels are
the group's G query heads, the last ``G·E`` their gates. Sharding the projection by KV group (tensor
parallelism) therefore keeps each head's q and gate on the same rank, and export can split the weight
group by group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from braid.config import ModelConfig
from braid.kernels.precision import at_least_fp32
from braid.models.attention import Attention
from braid.models.caches import KVCache
from braid.models.layers import SeqInfo
from braid.models.registry import register_mixer
from braid.models.tp_plan import Heads, Rows, TPPlan


@register_mixer("G")
class GatedAttention(Attention):
    # Declarations (read without importing this module, see braid/models/registry.py).
    cp_ops = ("attention",)  # the seq.ops methods forward calls
    s2_capable = True  # applies model.s2 to its attention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        if cfg.attn_gate not in ("headwise", "elementwise"):
            raise ValueError(f"model.attn_gate = {cfg.attn_gate!r} is invalid: headwise | elementwise")
        self.gate_dim = 1 if cfg.attn_gate == "headwise" else self.head_dim
        self.group = self.n_heads // self.n_kv_heads
        # Replaces Attention's q projection by the widened one (layout in the module docstring).
        self.q_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.group * (self.head_dim + self.gate_dim),
                                bias=False)

    def _q_and_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, T, d]`` → q ``[B, T, H, D]`` and gate logits ``[B, T, H, E]`` (E = 1 or D)."""
        # Local sizes under tp: this rank's KV heads (k_proj rows) and its query heads per KV group.
        n_kv = self.k_proj.weight.shape[0] // self.head_dim
        group = self.q_proj.weight.shape[0] // (self.head_dim + self.gate_dim) // n_kv
        y = self.q_proj(x).unflatten(-1, (n_kv, group * (self.head_dim + self.gate_dim)))
        q, gate = y.split([group * self.head_dim, group * self.gate_dim], dim=-1)
        # [B, T, Hkv, G·X] → [B, T, Hkv·G, X]: query head h = kv·G + g, as attention's GQA expects.
        q = q.unflatten(-1, (group, self.head_dim)).flatten(2, 3)
        gate = gate.unflatten(-1, (group, self.gate_dim)).flatten(2, 3)
        return q, gate

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return self._q_and_gate(x)[0]

    def q_row_heads(self) -> torch.Tensor:
        """Per KV head: its group's query rows (head kv·G + g), then its gate rows (-1)."""
        block = self.group * (self.head_dim + self.gate_dim)
        r = torch.arange(self.n_kv_heads * block)
        kv, within = r // block, r % block
        return torch.where(within < self.group * self.head_dim, kv * self.group + within // self.head_dim, -1)

    def forward(self, x: torch.Tensor, seq: SeqInfo, cache: Optional[KVCache] = None) -> torch.Tensor:
        """x ``[B, T, d]`` → ``[B, T, d]``; the gate is a sigmoid in fp32, applied in x's dtype; ``cache``:
        decoding, as ``Attention``."""
        q, gate = self._q_and_gate(x)
        k, v = self._kv(x, seq, cache)
        q, k = self._norm_rope(q, k, seq)
        o = self._attend(q, k, v, seq, cache=cache)
        o = o * torch.sigmoid(at_least_fp32(gate)).to(o.dtype)
        return self.o_proj(o.flatten(2))

    def flops_per_token(self, seq_len: int) -> float:
        """Attention's FLOPs plus the gate columns of the widened q projection."""
        gate_proj = 2 * self.q_proj.in_features * self.n_heads * self.gate_dim
        return super().flops_per_token(seq_len) + gate_proj

    def tp_plan(self, tp: int) -> TPPlan:
        """Attention's plan, with the widened ``q_proj`` laid out per KV group ``[Hkv, G·D | G·E]``:
        each rank takes its query heads' q and gate rows together (whole groups, or with KV heads
        replicated its part of one group: non-contiguous rows, so then q_proj replicates and each
        rank computes with its rows — memory, not FLOPs, is what this costs)."""
        plan = super().tp_plan(tp)
        plan.params["q_proj.weight"] = Rows((Heads(self.group, self.head_dim, "model.n_heads"),
                                             Heads(self.group, self.gate_dim, "model.n_heads")),
                                            groups=self.n_kv_heads)
        return plan
