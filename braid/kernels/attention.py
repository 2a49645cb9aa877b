"""Softmax attention: the public op and its torch implementation (SDPA)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def attention_mask(
    t: int,
    s: int,
    *,
    causal: bool = True,
    window: Optional[int] = None,
    doc_ids: Optional[torch.Tensor] = None,
    device: torch.device | str = "cpu",
) -> Optional[torch.Tensor]:
    """Boolean mask (True = may attend) ``[B or 1, 1, T, S]``; None when plain causal/full suffices.

    Queries are the last ``t`` of the ``s`` key positions (so decoding with a cache lines up).
    None means no mask is needed beyond SDPA's own ``is_causal`` for square causal attention.
    ``doc_ids`` ``[B, S]``: keys and queries attend only within the same document id.
    """
    if window is None and doc_ids is None and (t == s or not causal):
        return None
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = torch.ones(t, s, dtype=torch.bool, device=device)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        mask &= (q_pos - k_pos) < window
        if not causal:
            mask &= (k_pos - q_pos) < window
    mask = mask[None, None]
    if doc_ids is not None:
        same = doc_ids[:, -t:, None] == doc_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    doc_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA.

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, S, Hkv, D]`` with ``Hq % Hkv == 0`` (K/V are not repeated).
        causal: query i (the i-th of the last T positions) sees keys j ≤ its position.
        scale: logit scale, default ``D ** -0.5``.
        window: if set, only keys within the last ``window`` positions (self included) are visible.
        doc_ids: ``[B, S]`` integer document ids of a packed sequence; attention stays within a document.
    Returns:
        ``[B, T, Hq, D]`` in the dtype of ``q``.
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[0] != b or hq % hkv != 0:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} "
                         "must be [B,T,Hq,D] and [B,S,Hkv,D] with Hq a multiple of Hkv")
    if doc_ids is not None and tuple(doc_ids.shape) != (b, s):
        raise ValueError(f"attention: doc_ids {tuple(doc_ids.shape)} must be [B,S] = {(b, s)}")
    mask = attention_mask(t, s, causal=causal, window=window, doc_ids=doc_ids, device=q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal and mask is None and t == s,
        scale=scale,
        enable_gqa=hq != hkv,
    )
    return out.transpose(1, 2)
