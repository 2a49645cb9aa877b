"""Forgetting Transformer (Lin et al.): softmax attention with a data-dependent forget gate.

``log f_t = logsigmoid(W_f x_t + b_f)`` per query head (fp32); the attention logits get
``Σ_{j<l≤i} log f_l`` (computed by the attention op from the cumulative sum), so old keys fade
unless the gate stays open. No positional embedding unless ``cfg.fox.rope``.

Pro block options (``cfg.fox``; use with ``cfg.qk_norm``):
* kv_shift: ``k_t = α_t k̃_{t−1} + (1 − α_t) k̃_t`` with ``α = sigmoid(Linear(x))`` per KV head, a
  separate α for v; ``k̃_{t−1}`` is zero at the first token of a row and of every document.
* output_norm: RMSNorm per head on the attention output.
* output_gate: ``o ⊙ sigmoid(Linear(x))`` (one gate per channel) before the output projection.

Cached decoding (``FoXCache``): the KV cache also keeps the log forget gates of the cached keys and,
with kv_shift, the last pre-shift k and v (the shift's ``x_{t−1}`` for the next call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from braid.config import ModelConfig
from braid.kernels.precision import at_least_fp32
from braid.models.attention import Attention
from braid.models.caches import KVCache
from braid.models.layers import RMSNorm, Rotary, SeqInfo
from braid.models.registry import register_mixer, register_options
from braid.models.tp_plan import Split, TPPlan


@register_options("fox")
@dataclass
class FoxConfig:
    """Forgetting Transformer (letter F). The Pro block = qk_norm + output_gate + output_norm + kv_shift."""

    rope: bool = False  # FoX uses no positional embedding by default
    output_gate: bool = False  # o_proj(norm(o) * sigmoid(Linear(x)))
    output_norm: bool = False  # RMSNorm per head on the attention output
    kv_shift: bool = False  # k_t = a_t k_{t-1} + (1 - a_t) k_t (same for v), a = sigmoid(Linear(x))
    forget_bias_init: Optional[float] = None  # None: default Linear init of the forget-gate bias


def shift_mix(x: torch.Tensor, alpha_logits: torch.Tensor, doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Learned 2-tap token shift ``α_t x_{t−1} + (1 − α_t) x_t``, never across a document start.

    Args:
        x: ``[B, T, H, D]``; alpha_logits: ``[B, T, H]`` (α = sigmoid, in fp32);
        doc_ids: ``[B, T]`` or None. ``x_{t−1}`` counts as zero at t = 0 and where the document changes,
            so a packed document sees exactly what it would see alone.
    Returns:
        ``[B, T, H, D]`` in x's dtype.
    """
    prev = F.pad(x[:, :-1], (0, 0, 0, 0, 1, 0))
    if doc_ids is not None:
        same = torch.ones_like(doc_ids, dtype=torch.bool)
        same[:, 1:] = doc_ids[:, 1:] == doc_ids[:, :-1]
        prev = prev * same[:, :, None, None].to(prev.dtype)
    a = torch.sigmoid(at_least_fp32(alpha_logits))[..., None]
    return (a * at_least_fp32(prev) + (1 - a) * at_least_fp32(x)).to(x.dtype)


class FoXCache(KVCache):
    """A FoX layer's decoding cache: keys, values and forget gates (``KVCache``) and, with kv_shift,
    the previous call's last pre-shift k and v ``[B, 1, Hkv, D]`` (None before the first call)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.k_last: Optional[torch.Tensor] = None
        self.v_last: Optional[torch.Tensor] = None


def _shift_continued(prev: Optional[torch.Tensor], raw: torch.Tensor, alpha: torch.Tensor):
    """The kv shift continued across calls: ``prev`` (the previous call's last raw k or v, None: zero)
    is x_{t−1} of the first new token. Returns the shifted rows and the next ``prev``."""
    prev = torch.zeros_like(raw[:, :1]) if prev is None else prev
    full = shift_mix(torch.cat([prev, raw], 1), torch.cat([torch.zeros_like(alpha[:, :1]), alpha], 1), None)
    return full[:, 1:], raw[:, -1:]


@register_mixer("F")
class FoX(Attention):
    # Declarations (read without importing this module, see braid/models/registry.py).
    cp_ops = ("attention", "local_mix")  # the seq.ops methods forward calls
    s2_capable = True  # applies model.s2 to its attention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        fox, d, hd = cfg.fox, cfg.d_model, self.head_dim
        self.rotary = Rotary(hd, cfg.rope_theta, cfg.rotary_percent) if fox.rope else None  # FoX ignores model.pos_emb
        self.forget_bias_init = fox.forget_bias_init
        self.fgate_proj = nn.Linear(d, self.n_heads, bias=True)
        self.k_shift_proj = nn.Linear(d, self.n_kv_heads, bias=False) if fox.kv_shift else None
        self.v_shift_proj = nn.Linear(d, self.n_kv_heads, bias=False) if fox.kv_shift else None
        self.out_norm = RMSNorm(hd, cfg.norm_eps) if fox.output_norm else None
        self.out_gate_proj = nn.Linear(d, self.n_heads * hd, bias=False) if fox.output_gate else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The forget-gate bias (``cfg.fox.forget_bias_init``, if set); everything else is generic."""
        if self.forget_bias_init is not None:
            nn.init.constant_(self.fgate_proj.bias, self.forget_bias_init)

    def log_forget(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, d]`` → ``log f`` ``[B, T, H]`` fp32 (≤ 0), projection included in fp32 (it is tiny,
        and bf16 logits would quantise slow decay rates)."""
        with torch.autocast(x.device.type, enabled=False):
            w, b = self.fgate_proj.weight, self.fgate_proj.bias
            dt = torch.promote_types(at_least_fp32(x).dtype, w.dtype)
            return F.logsigmoid(F.linear(x.to(dt), w.to(dt), b.to(dt)))

    def _kv(self, x: torch.Tensor, seq: SeqInfo, cache: Optional[FoXCache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super()._kv(x, seq)
        if self.k_shift_proj is None:
            return k, v
        if cache is not None:  # decoding: x_{t−1} of the first new token is the cached last one
            k, cache.k_last = _shift_continued(cache.k_last, k, self.k_shift_proj(x))
            v, cache.v_last = _shift_continued(cache.v_last, v, self.v_shift_proj(x))
            return k, v
        # Each token reads the one before it (across context-parallel segments too).
        k = seq.ops.local_mix(shift_mix, 1, k, self.k_shift_proj(x), seq.doc_ids)
        v = seq.ops.local_mix(shift_mix, 1, v, self.v_shift_proj(x), seq.doc_ids)
        return k, v

    def new_cache(self, stream) -> Optional[FoXCache]:
        return FoXCache(stream) if self.s2 is None else None

    def forward(self, x: torch.Tensor, seq: SeqInfo, cache: Optional[FoXCache] = None) -> torch.Tensor:
        """x ``[B, T, d]`` → ``[B, T, d]`` in x's dtype; ``cache``: decoding (see the module docstring)."""
        k, v = self._kv(x, seq, cache)
        q, k = self._norm_rope(self._q(x), k, seq)
        o = self._attend(q, k, v, seq, log_forget=self.log_forget(x), cache=cache)
        if self.out_norm is not None:
            o = self.out_norm(o)
        if self.out_gate_proj is not None:
            gate = torch.sigmoid(at_least_fp32(self.out_gate_proj(x))).to(o.dtype)
            o = o * gate.unflatten(-1, (-1, self.head_dim))
        return self.o_proj(o.flatten(2))

    def flops_per_token(self, seq_len: int) -> float:
        """Attention's FLOPs plus the forget gate, the shift gates and the output gate."""
        d = self.q_proj.in_features
        extra = self.n_heads + (2 * self.n_kv_heads if self.k_shift_proj is not None else 0)
        if self.out_gate_proj is not None:
            extra += self.n_heads * self.head_dim
        return super().flops_per_token(seq_len) + 2 * d * extra

    def tp_plan(self, tp: int) -> TPPlan:
        """Attention's split plus the per-head forget gate, the per-KV-head shift gates (replicated
        with the KV heads) and the per-channel output gate; the output norm (per head, one shared
        weight) replicates."""
        plan = super().tp_plan(tp)
        plan.params.update({"fgate_proj.weight": Split(0), "fgate_proj.bias": Split(0)})
        if self.out_gate_proj is not None:
            plan.params["out_gate_proj.weight"] = Split(0)
        if self.k_shift_proj is not None:
            plan.params.update({"k_shift_proj.weight": self._kv_rows(1), "v_shift_proj.weight": self._kv_rows(1)})
        return plan
