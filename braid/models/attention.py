"""Softmax attention mixer: GQA, RoPE or none, optional QK-norm and sliding window.

The steps are separate methods (``_q``, ``_kv``, ``_norm_rope``, ``_attend``) so that the gated
attention and FoX mixers reuse them and only override what differs.

Cached decoding: ``forward(x, seq, cache)`` with the layer's ``KVCache`` (``new_cache``) attends the
new queries to the cached keys instead of running ``seq.ops.attention`` over the sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from braid.config import ModelConfig
from braid.kernels.attention import attention_mask
from braid.kernels.s2 import S2Pattern
from braid.models.caches import KVCache
from braid.models.layers import Rotary, SeqInfo, layer_window, mark_output_projection, model_norm
from braid.models.registry import register_mixer
from braid.models.tp_plan import Heads, Rows, Split, TPPlan
from braid.models.visible_keys import mean_visible_keys, s2_mean_visible_keys


@register_mixer("A")
class Attention(nn.Module):
    # Declarations (read without importing this module, see braid/models/registry.py).
    cp_ops = ("attention",)  # the seq.ops methods forward calls
    s2_capable = True  # applies model.s2 to its attention

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
        self.q_norm = model_norm(cfg, hd) if cfg.qk_norm else None
        self.k_norm = model_norm(cfg, hd) if cfg.qk_norm else None
        self.rotary = Rotary(hd, cfg.rope_theta, cfg.rotary_percent) if cfg.pos_emb == "rope" else None
        s2 = cfg.s2
        self.s2 = S2Pattern(block=s2.block, local_blocks=s2.local_blocks, vert_stride=s2.vert_stride,
                            n_heads=self.n_heads) if s2.enabled else None
        # QK-clip (braid/trainer/qk_clip.py) turns this on: training forwards then keep the largest
        # attention logit per query head ``[H]`` since the last optimizer step in ``max_logit``.
        self.track_max_logit = False
        self.max_logit: Optional[torch.Tensor] = None

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, d]`` → q ``[B, T, H, D]`` (before norm/RoPE)."""
        return self.q_proj(x).unflatten(-1, (-1, self.head_dim))  # local heads under tp

    def _kv(self, x: torch.Tensor, seq: SeqInfo, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, T, d]`` → k, v ``[B, T, Hkv, D]`` (before norm/RoPE); ``cache``: the layer's decoding
        cache, for variants whose k/v read earlier tokens."""
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        return k, v

    def _norm_rope(self, q: torch.Tensor, k: torch.Tensor, seq: SeqInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """QK-norm (per head, over D) then RoPE, each if configured; shapes unchanged."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, seq.position_ids), self.rotary(k, seq.position_ids)
        return q, k

    def _attend(self, q, k, v, seq: SeqInfo, log_forget: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        """Causal attention ``[B, T, H, D]`` with this layer's window, the documents, meta-token sinks and
        the S2 pattern (``model.s2.enabled``); with ``cache`` (decoding) over the cached keys too."""
        if cache is not None:
            if self.s2 is not None:
                raise NotImplementedError("no incremental decoding with the S2 attention pattern (model.s2.enabled)")
            return cache.attend(q, k, v, log_forget, window=self.window, sink=seq.meta_tokens)
        if self.track_max_logit and torch.is_grad_enabled():
            self._record_max_logit(q, k, seq)
        return seq.ops.attention(q, k, v, causal=True, window=self.window, sink=seq.meta_tokens,
                                 doc_ids=seq.doc_ids, log_forget=log_forget, s2=self.s2)

    @torch.no_grad()
    def _record_max_logit(self, q: torch.Tensor, k: torch.Tensor, seq: SeqInfo, chunk: int = 256) -> None:
        """Running max of ``D^-½ q_i·k_j`` over the pairs the causal / window / document / sink mask lets
        attend (the S2 pattern is not applied: its pairs are a subset, so this bounds its max from
        above), in query chunks so no ``[T, T]`` logits per head are held at once. FoX's forget bias
        only lowers logits and is left out."""
        b, t, h, d = q.shape
        kk = k.repeat_interleave(h // k.size(2), dim=2).float()
        mask = attention_mask(t, t, causal=True, window=self.window, doc_ids=seq.doc_ids, sink=seq.meta_tokens,
                              device=q.device)
        best = torch.full((h,), float("-inf"), device=q.device)
        for lo in range(0, t, chunk):
            hi = min(lo + chunk, t)
            s = torch.einsum("bqhd,bkhd->bhqk", q[:, lo:hi].float(), kk) * d ** -0.5
            visible = (torch.arange(lo, hi, device=q.device)[:, None] >= torch.arange(t, device=q.device)
                       if mask is None else mask[:, :, lo:hi])
            best = torch.maximum(best, s.masked_fill(~visible, float("-inf")).amax(dim=(0, 2, 3)))
        self.max_logit = best if self.max_logit is None else torch.maximum(self.max_logit, best)

    def q_row_heads(self) -> torch.Tensor:
        """The query head each output row of ``q_proj`` feeds (-1: a row that is no query channel)."""
        return torch.arange(self.n_heads * self.head_dim) // self.head_dim

    def new_cache(self, stream) -> Optional[KVCache]:
        """This layer's decoding cache (None: the S2 pattern has no cached decoding yet)."""
        return KVCache(stream) if self.s2 is None else None

    def forward(self, x: torch.Tensor, seq: SeqInfo, cache: Optional[KVCache] = None) -> torch.Tensor:
        """x ``[B, T, d]`` → ``[B, T, d]`` in x's dtype; ``cache``: see the module docstring."""
        k, v = self._kv(x, seq, cache)
        q, k = self._norm_rope(self._q(x), k, seq)
        o = self._attend(q, k, v, seq, cache=cache)
        return self.o_proj(o.flatten(2))

    def _mixing_flops(self, seq_len: int) -> float:
        """QKᵀ and PV: 2 matmuls × 2 FLOPs × H·D per visible key (S2 skips whole blocks: not counted)."""
        if self.s2 is None:
            visible = mean_visible_keys(seq_len, self.window)
        else:
            visible = s2_mean_visible_keys(self.s2, seq_len, self.n_heads, self.window)
        return 4 * self.n_heads * self.head_dim * visible

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token, averaged over the positions of a causal sequence."""
        d = self.q_proj.in_features
        proj = 2 * d * (2 * self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        return proj + self._mixing_flops(seq_len)

    def _kv_rows(self, rows: int) -> Rows:
        """A projection of ``rows`` rows per KV head: split over tp, or replicated when tp is a multiple
        of n_kv_heads (Megatron's KV replication: rank r uses KV head r // (tp / n_kv_heads))."""
        return Rows((Heads(self.n_kv_heads, rows, "model.n_kv_heads", shared=True),))

    def _tp_at_rank(self, rank: int, tp: int) -> None:
        if self.s2 is not None:  # S2 residues follow the global head index
            self.s2 = dataclasses.replace(self.s2, head_start=self.s2.head_start + rank * (self.n_heads // tp))

    def tp_plan(self, tp: int) -> TPPlan:
        """Query, key and value heads split over tp (GQA groups stay on one rank, KV heads replicated
        when fewer than tp), ``o_proj`` by input columns; QK-norm weights (shared by heads) replicate."""
        kv = self._kv_rows(self.head_dim)
        return TPPlan(params={"k_proj.weight": kv, "v_proj.weight": kv,
                              "q_proj.weight": Rows((Heads(self.n_heads, self.head_dim, "model.n_heads"),)),
                              "o_proj.weight": Split(1)}, at_rank=self._tp_at_rank)
