"""Softmax attention mixer: GQA, RoPE or none, optional QK-norm and sliding window."""

from __future__ import annotations

import torch
import torch.nn as nn

from braid.config import ModelConfig
from braid.kernels import attention
from braid.models.layers import RMSNorm, Rotary, SeqInfo, layer_window, mark_output_projection
from braid.models.registry import register_mixer


@register_mixer("A")
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.window = layer_window(cfg, layer_idx)
        d, hd = cfg.d_model, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = mark_output_projection(nn.Linear(self.n_heads * hd, d, bias=False))
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary(hd, cfg.rope_theta) if cfg.pos_emb == "rope" else None

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, seq.position_ids), self.rotary(k, seq.position_ids)
        o = attention(q, k, v, causal=True, window=self.window, doc_ids=seq.doc_ids)
        return self.o_proj(o.reshape(b, t, -1))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token, averaged over the positions of a causal sequence."""
        d = self.q_proj.in_features
        proj = 2 * d * (2 * self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        w = self.window or seq_len
        # Mean number of visible keys: min(t + 1, w) over t = 0..seq_len-1.
        visible = sum(min(i + 1, w) for i in range(seq_len)) / seq_len
        return proj + 4 * self.n_heads * self.head_dim * visible
