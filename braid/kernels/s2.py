"""S2 strided block-sparse attention pattern (Lin et al., "Efficient LLM Training and Serving with
Heterogeneous Context Sharding among Attention Heads").

Positions are cut into blocks of ``block`` tokens (block of a position = position // block). Head ``h``
lets query block ``i`` see key block ``j`` iff

    causal: j ≤ i   and   (i − j < local_blocks  or  (j + r_h) % vert_stride == 0)
    r_h = (h · step + offset) mod vert_stride,   step = max(1, vert_stride // n_heads)

so every head keeps the ``local_blocks`` most recent blocks plus every ``vert_stride``-th older block,
and different heads take different residues ``r_h``: with ``n_heads ≥ vert_stride`` their union covers
every block. Non-causal attention uses ``|i − j| < local_blocks`` for the local part. Token-level
visibility is this block rule ∧ the causal/window/document rules of ``braid.kernels.attention``
(sink keys ignore it, as they ignore windows and documents).

Head indices are global: a tensor-parallel rank holding heads ``head_start .. head_start + H − 1`` of
``n_heads`` passes both so that every rank computes the same pattern as one device would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class S2Pattern:
    """Per-head block pattern; see the module docstring.

    Attributes:
        block: block size in tokens (> 0).
        local_blocks: recent blocks (the query's own included) every head sees (≥ 1).
        vert_stride: period of the vertical blocks (≥ 1; 1 = dense).
        offset: shift of every head's residue.
        n_heads: global number of query heads that defines ``step``; default: the heads of the call.
        head_start: global index of the call's first query head (tensor parallelism).
    """

    block: int = 64
    local_blocks: int = 32
    vert_stride: int = 8
    offset: int = 0
    n_heads: Optional[int] = None
    head_start: int = 0

    def __post_init__(self):
        for key, low in (("block", 1), ("local_blocks", 1), ("vert_stride", 1)):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < low:
                raise ValueError(f"s2.{key} must be an integer ≥ {low}, got {getattr(self, key)!r}")
        if self.n_heads is not None and self.n_heads < 1:
            raise ValueError(f"s2.n_heads must be ≥ 1 or None, got {self.n_heads!r}")

    def step(self, n_heads: int) -> int:
        """Residue step between consecutive heads: ``max(1, vert_stride // n_heads)``."""
        return max(1, self.vert_stride // (self.n_heads or n_heads))

    def residue(self, h, n_heads: int):
        """``r_h`` for local head index ``h`` (int or int tensor) of a call with ``n_heads`` heads."""
        return ((self.head_start + h) * self.step(n_heads) + self.offset) % self.vert_stride

    def block_visible(self, h, i, j, n_heads: int, causal: bool = True):
        """Whether head ``h`` lets query block ``i`` see key block ``j`` (ints or broadcasting int tensors)."""
        near = (i - j < self.local_blocks) if causal else (abs(i - j) < self.local_blocks)
        vertical = (j + self.residue(h, n_heads)) % self.vert_stride == 0
        ok = near | vertical
        return ok & (j <= i) if causal else ok

    def token_mask(self, heads: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, n_heads: int,
                   causal: bool = True) -> torch.Tensor:
        """Bool ``[H, t, s]``: the block rule at token positions (heads ``[H]``, positions ``[t]``/``[s]`` int64)."""
        i = torch.div(q_pos, self.block, rounding_mode="floor")[None, :, None]
        j = torch.div(k_pos, self.block, rounding_mode="floor")[None, None, :]
        return self.block_visible(heads[:, None, None], i, j, n_heads, causal)

    def any_visible(self, residue: int, q_lo: int, q_hi: int, k_lo: int, k_hi: int, causal: bool = True) -> bool:
        """Whether any pair of positions ``[q_lo, q_hi] × [k_lo, k_hi]`` passes the block rule for a head
        with residue ``residue`` (used to skip whole tiles; exact at block granularity)."""
        qi0, qi1 = q_lo // self.block, q_hi // self.block
        kj0, kj1 = k_lo // self.block, k_hi // self.block
        if causal:
            kj1 = min(kj1, qi1)  # only key blocks j ≤ some i count
            if kj0 > kj1:
                return False
            local = kj1 > qi0 - self.local_blocks
        else:
            local = kj0 < qi1 + self.local_blocks and kj1 > qi0 - self.local_blocks
        first_vertical = kj0 + (-(kj0 + residue)) % self.vert_stride  # smallest j ≥ kj0 on the stride
        return local or first_vertical <= kj1

    def density(self, n_blocks: int, n_heads: int, causal: bool = True) -> float:
        """Fraction of the (causal) block pairs of ``n_blocks`` blocks that the heads visit, on average."""
        i = torch.arange(n_blocks)[None, :, None]
        j = torch.arange(n_blocks)[None, None, :]
        vis = self.block_visible(torch.arange(n_heads)[:, None, None], i, j, n_heads, causal)
        total = n_heads * (n_blocks * (n_blocks + 1) // 2 if causal else n_blocks * n_blocks)
        return float(vis.sum()) / total
