"""The FoX forget-gate bias across ranks: ``c = cumsum(log f)`` over the global sequence.

Each rank sums its segments' log gates, the sums are all-gathered (differentiably), and every segment
adds the exclusive prefix of the segments before it in global order (an exclusive scan over segments),
so ``c_q − c_k`` between any two positions equals the cp = 1 value.
"""

from __future__ import annotations

import torch

from braid.parallel.collectives import all_gather


def global_forget_cumsum(cps, log_forget: torch.Tensor) -> torch.Tensor:
    """log_forget ``[B, M+T_loc, H]`` (local gates) → fp32 (fp64 stays) global cumulative sums, same shape."""
    m = cps.meta
    lf = log_forget.to(torch.promote_types(log_forget.dtype, torch.float32))
    meta = lf[:, :m].cumsum(1)
    base = meta[:, -1] if m else torch.zeros_like(lf[:, 0])
    local = [lf[:, m + s.offset: m + s.offset + s.length].cumsum(1) for s in cps.layout.local]
    totals = torch.stack([c[:, -1] for c in local], 1)  # [B, nseg, H]
    every = all_gather(totals, cps.group, "fox.sums")  # [cp, B, nseg, H]
    order = cps.layout.global_order()
    ordered = torch.stack([every[r, :, i] for r, i in order], 1)  # [B, n_segments, H] in global order
    # One exclusive scan over every segment, then this rank's entries: the gathered tensor stays in
    # the graph on every rank, so every rank joins the backward reduce-scatter (even rank 0, whose
    # prefixes are all zero).
    prefix = base[:, None] + ordered.cumsum(1) - ordered
    mine = [order.index((cps.rank, i)) for i in range(len(local))]
    parts = [meta] + [c + prefix[:, j, None] for c, j in zip(local, mine)]
    return torch.cat(parts, 1)
