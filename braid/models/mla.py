"""Multi-head latent attention (letter M), DeepSeek-V2/V3; with ``mla.rope = False`` the NoPE variant
of Kimi Linear.

Per token ``x``:
* queries ``q = W_q x`` ``[H, nope + rope]``, or low rank ``q = W_qb RMSNorm(W_qa x)`` when
  ``mla.q_lora_rank`` is set;
* one down-projection ``W_kva x = [c_kv | k_rope]``: the latent ``c_kv`` (``kv_lora_rank``) and a
  single rope key slice shared by all heads;
* ``[k_nope | v] = W_kvb RMSNorm(c_kv)`` per head;
* ``q = [q_nope | R q_rope]``, ``k = [k_nope | R k_rope]`` (R = rotary on the rope slices only, or
  the identity for NoPE), scores scaled by ``(nope + rope)^-½``, ``o_proj`` over ``H · v_head_dim``.

Parameter names follow Hugging Face DeepSeek-V3 (q_proj | q_a_proj/q_a_layernorm/q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj) so export is a renaming. Rotary uses braid's
rotate-half convention; DeepSeek checkpoints rotate interleaved pairs, so converting one permutes the
rope rows of q_b_proj (or q_proj) and kv_a_proj_with_mqa (even dims first, then odd ones).

Training computes the full per-head K/V (the latent is only a cache-size trick at decoding time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from braid.config import ModelConfig
from braid.kernels import attention
from braid.models.layers import RMSNorm, Rotary, SeqInfo, layer_window, mark_output_projection
from braid.models.registry import register_mixer, register_options
from braid.models.visible_keys import mean_visible_keys


@register_options("mla")
@dataclass
class MLAConfig:
    """Multi-head latent attention (letter M), DeepSeek-V2/V3."""

    n_heads: Optional[int] = None  # default: model.n_heads
    q_lora_rank: Optional[int] = None  # None: full-rank q projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope: bool = True  # False: NoPE (Kimi Linear), the rope slice is kept but not rotated


@register_mixer("M")
class MLA(nn.Module):
    # Declarations (read without importing this module, see braid/models/registry.py).
    cp_ops = ("attention",)  # the seq.ops methods forward calls
    s2_capable = False  # applies model.s2 to its attention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        m = cfg.mla
        self.n_heads = m.n_heads or cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.kv_lora_rank, self.q_lora_rank = m.kv_lora_rank, m.q_lora_rank
        self.window = layer_window(cfg, layer_idx)
        self.sink_default = cfg.meta_tokens  # for flops only; forward uses seq.meta_tokens
        if self.qk_dim <= 0 or self.v_dim <= 0 or self.kv_lora_rank <= 0:
            raise ValueError(f"MLA layer {layer_idx}: head dims and kv_lora_rank must be > 0")
        d, h = cfg.d_model, self.n_heads
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = mark_output_projection(nn.Linear(h * self.v_dim, d, bias=False))
        # model.pos_emb = none turns positions off for every mixer; mla.rope = false only for MLA.
        use_rope = m.rope and cfg.pos_emb == "rope" and self.rope_dim > 0
        if use_rope and self.rope_dim % 2:
            raise ValueError(f"MLA layer {layer_idx}: model.mla.qk_rope_head_dim={self.rope_dim} must be "
                             "even for RoPE")
        self.rotary = Rotary(self.rope_dim, cfg.rope_theta) if use_rope else None

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, d]`` → un-rotated queries ``[B, T, H, nope + rope]``."""
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        return q.unflatten(-1, (self.n_heads, self.qk_dim))

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        """x ``[B, T, d]`` → ``[B, T, d]`` (same dtype)."""
        b, t, _ = x.shape
        q_nope, q_rope = self.queries(x).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).unflatten(-1, (self.n_heads, self.nope_dim + self.v_dim))
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = k_rope[:, :, None, :]  # one rope key for all heads
        if self.rotary is not None:
            q_rope = self.rotary(q_rope, seq.position_ids)
            k_rope = self.rotary(k_rope, seq.position_ids)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(b, t, self.n_heads, self.rope_dim)], dim=-1)
        op = attention if seq.cp is None else seq.cp.attention
        o = op(q, k, v, causal=True, scale=self.qk_dim ** -0.5, window=self.window, sink=seq.meta_tokens,
               doc_ids=seq.doc_ids)
        return self.o_proj(o.reshape(b, t, self.n_heads * self.v_dim))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token: the projections plus scores and values over the mean
        number of visible keys (window and meta-token sinks included) of a causal sequence."""
        proj = sum(mod.weight.numel() for mod in self.modules() if isinstance(mod, nn.Linear))
        visible = mean_visible_keys(seq_len, self.window, self.sink_default)
        return 2 * proj + 2 * self.n_heads * (self.qk_dim + self.v_dim) * visible
