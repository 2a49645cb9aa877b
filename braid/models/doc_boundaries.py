"""Where packed documents start, and which earlier position each causal-conv tap reads.

Shared by every mixer that mixes neighbouring positions (KDA's short convs, Hymba's SSM conv) and by
the single-device scans that restart at document starts (``braid.models.seq_ops``). The rule: a
document never reads another one; behind meta tokens it reads the meta prefix instead, as if it
followed the prefix directly, so a packed document computes what it computes alone.
"""

from __future__ import annotations

from typing import Optional

import torch


def document_starts(doc_ids: torch.Tensor, meta_tokens: int) -> torch.Tensor:
    """doc_ids ``[B, T]`` (the first ``meta_tokens`` positions are the meta prefix) → ``[B, T]`` bool,
    True where a document (or the row) starts; position ``meta_tokens`` always starts one, so a
    context-parallel piece ``[meta, halo, segment]`` gets the same starts as the whole sequence."""
    t, m = doc_ids.shape[1], meta_tokens
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    if 0 < m < t:
        start[:, m] = True
    return start


def conv_sources(doc_ids: torch.Tensor, meta_tokens: int, width: int,
                 starts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which position feeds each tap of a causal conv of ``width`` taps over packed documents.

    doc_ids ``[B, T]`` → ``[B, T, width]`` int64: for tap ``lag`` (lag steps back) at t, t − lag inside
    t's document (or inside the meta prefix), else the meta position the tap reads when the document
    follows the prefix directly (m + offset − lag), else −1 (zero padding). ``starts``: this
    function's own :func:`document_starts`, when the caller already has it.
    """
    m = meta_tokens
    pos = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    start = document_starts(doc_ids, m) if starts is None else starts
    offset = pos - torch.where(start, pos, 0).cummax(dim=1).values  # position inside its document
    lag = torch.arange(width, device=doc_ids.device)
    inside = pos[:, None] - lag  # [T, W]
    before = (torch.where(pos >= m, m, 0) + offset)[..., None] - lag  # [B, T, W], into the meta prefix
    return torch.where(offset[..., None] >= lag, inside, torch.where(before >= 0, before, -1))
