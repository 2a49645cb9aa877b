"""How many keys a query sees on average in a causal sequence: the attention term of the FLOPs that
the log line's TFLOP/s and MFU count (a sliding window or a sparse pattern does less work, and
counting dense work would overstate the throughput).
"""

from __future__ import annotations

from typing import Optional

import torch

from braid.kernels.s2 import S2Pattern


def _sum_min(n: int, cap: int) -> int:
    """``Σ_{k=1..n} min(k, cap)``."""
    if n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


def mean_visible_keys(seq_len: int, window: Optional[int] = None, sink: int = 0) -> float:
    """Mean number of keys a query sees over positions ``0..seq_len−1`` of a causal sequence.

    Key j is visible to query i iff ``j ≤ i`` and (``i − j < window`` or ``j < sink``): query i sees
    ``min(i + 1, w)`` keys in its window plus ``min(sink, i + 1 − w)`` older sinks (closed form).
    """
    if seq_len <= 0:
        return 0.0
    w = min(window or seq_len, seq_len)
    return (_sum_min(seq_len, w) + _sum_min(seq_len - w, sink)) / seq_len


def s2_mean_visible_keys(pattern: S2Pattern, seq_len: int, n_heads: int, window: Optional[int] = None) -> float:
    """:func:`mean_visible_keys` under the S2 block pattern, averaged over the ``n_heads`` heads: the
    keys with ``j ≤ i``, ``i − j < window`` and head h's block rule for blocks ``(i // block, j // block)``.

    Exact for any length, in O(blocks²) per distinct head residue: a key block either passes the block
    rule whole or not at all, so the count is Σ over visible block pairs of the token pairs the causal
    and window rules leave in that pair, which depends only on the block distance Δ (and, for the
    last block, on how many rows it has)."""
    if seq_len <= 0:
        return 0.0
    b = pattern.block
    w = min(window or seq_len, seq_len)
    nb = -(-seq_len // b)
    dist = torch.arange(nb)

    def pairs(rows: int) -> torch.Tensor:
        # [nb]: pairs (a, c) of query row a < rows and key column c < b whose distance Δ·b + a − c lies
        # in [0, w). Only the last query block can be short; a key block behind it is always full.
        offsets = (torch.arange(rows)[:, None] - torch.arange(b)[None, :]).flatten() + (b - 1)
        hist = torch.bincount(offsets, minlength=rows + b - 1)  # how many (a, c) have a − c = idx − (b − 1)
        d = dist[:, None] * b + torch.arange(rows + b - 1)[None, :] - (b - 1)
        return (((d >= 0) & (d < w)).long() * hist).sum(1)

    full, last = pairs(b), pairs(seq_len - (nb - 1) * b)
    q_blocks = dist[None, :]  # [1, nb]: I
    k_blocks = q_blocks - dist[:, None]  # [nb, nb]: J = I − Δ, row Δ
    total = 0
    residues = [int(pattern.residue(h, n_heads)) for h in range(n_heads)]
    for r in set(residues):
        near = dist[:, None] < pattern.local_blocks
        vertical = (k_blocks + r) % pattern.vert_stride == 0
        vis = (near | vertical) & (k_blocks >= 0)  # [Δ, I]
        per_head = (vis[:, :-1].sum(1) * full).sum() + (vis[:, -1].long() * last).sum()
        total += residues.count(r) * int(per_head)
    return total / (n_heads * seq_len)
