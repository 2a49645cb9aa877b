"""QK-clip (Kimi K2's MuonClip without the Muon part): after an optimizer step, every query head whose
largest attention logit S_h over the step's batch exceeded ``tau`` has its logits scaled by
γ_h = tau / S_h, by scaling the W_q and W_k rows that produce them.

Kimi splits γ evenly (√γ on W_q, √γ on W_k) for its per-head keys. With grouped KV heads a key head
is shared by G query heads, so the KV head takes √(min γ over its group) and each query head the rest,
γ_h / √(min γ): every head's logits scale by exactly its own γ_h, heads under the threshold included.

The max logits come from the forward of the mixers that track them (``track_max_logit``: softmax attention),
recomputed in fp32 alongside the fused kernel (an extra QKᵀ per attention layer and micro-batch; the
kernels do not return their row maxima). Layers with QK-norm are left alone: normalised q and k do
not scale with W_q / W_k, their logits are bounded by the norm weights. Not under tensor or context
parallelism (validated): the per-head maxima would need the heads of the other tp ranks or the keys
of the other cp ranks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from braid.trainer.muon import shard_like


def clipped_modules(model: nn.Module) -> list[nn.Module]:
    """The mixers that record their max logits (they define ``track_max_logit``), without QK-norm."""
    return [m for m in model.modules() if hasattr(m, "track_max_logit") and m.q_norm is None]


def enable(model: nn.Module) -> int:
    """Turn on max-logit tracking; the number of attention layers QK-clip covers."""
    modules = clipped_modules(model)
    for m in modules:
        m.track_max_logit = True
    return len(modules)


def _scale_rows(p: torch.Tensor, rows: torch.Tensor) -> None:
    full = rows.to(p.dtype)[:, None].expand(p.shape).contiguous()
    p.mul_(shard_like(full, p))


def reset(model: nn.Module) -> None:
    """Forget the maxima of a step whose update was skipped."""
    for m in clipped_modules(model):
        m.max_logit = None


@torch.no_grad()
def qk_clip(model: nn.Module, tau: float, reduce_max: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Clip every tracked layer and reset its tracking; the largest logit seen (for the log), -inf if none.
    ``reduce_max`` takes the maximum over the data-parallel ranks (every rank must clip the same way)."""
    worst = float("-inf")
    for m in clipped_modules(model):
        if m.max_logit is None:  # an evaluation-only interval or a skipped step
            continue
        s = reduce_max(m.max_logit.clone())
        m.max_logit = None
        worst = max(worst, s.max().item())
        gamma = torch.where(s > tau, tau / s, torch.ones_like(s))
        if bool((gamma == 1).all()):
            continue
        group = m.n_heads // m.n_kv_heads
        gk = gamma.view(m.n_kv_heads, group).amin(dim=1)  # per KV head
        q_gamma = gamma / gk.sqrt().repeat_interleave(group)
        heads = m.q_row_heads().to(gamma.device)
        q_rows = torch.where(heads >= 0, q_gamma[heads.clamp(min=0)], torch.ones((), device=gamma.device))
        _scale_rows(m.q_proj.weight, q_rows)
        _scale_rows(m.k_proj.weight, gk.sqrt().repeat_interleave(m.head_dim))
    return worst
