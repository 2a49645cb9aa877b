"""Which global positions each context-parallel rank holds.

The global text sequence of ``T`` tokens is cut into segments. ``contiguous``: ``cp`` equal segments,
rank r holds segment r. ``zigzag`` (causal softmax load balance): ``2·cp`` equal chunks, rank r holds
chunks r and 2·cp−1−r, so every rank has one early (cheap) and one late (expensive) chunk.
A rank's local text tensor is its segments concatenated in global order.

Hymba meta tokens are not part of the layout: every rank prepends the same ``M`` meta tokens to its
local text (at attention positions 0..M−1, text at M + global position) and computes them redundantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Segment:
    """``length`` tokens at global text positions ``start..start+length-1``, stored from ``offset`` in
    the rank's local text tokens (meta tokens excluded)."""

    start: int
    length: int
    offset: int

    @property
    def stop(self) -> int:
        return self.start + self.length


class CPLayout:
    """The segments of every rank for a global text length ``seq_len`` over ``size`` ranks."""

    def __init__(self, seq_len: int, size: int, rank: int, kind: str = "zigzag"):
        if kind not in LAYOUTS:
            raise ValueError(f"context parallel layout {kind!r} is unknown (allowed: {', '.join(LAYOUTS)})")
        pieces = 2 * size if kind == "zigzag" else size
        if seq_len % pieces:
            raise ValueError(f"context parallelism ({kind}, cp={size}) needs the sequence length to be a multiple "
                             f"of {pieces}; got {seq_len} (data.seq_length)")
        self.seq_len, self.size, self.rank, self.kind = seq_len, size, rank, kind
        n = seq_len // pieces
        self.chunk = n
        self._segments = []
        for r in range(size):
            chunks = [r] if kind == "contiguous" else [r, 2 * size - 1 - r]
            self._segments.append(tuple(Segment(c * n, n, i * n) for i, c in enumerate(chunks)))

    def segments_of(self, rank: int) -> tuple[Segment, ...]:
        return self._segments[rank]

    @property
    def local(self) -> tuple[Segment, ...]:
        return self._segments[self.rank]

    @property
    def local_len(self) -> int:
        return sum(s.length for s in self.local)

    def global_order(self) -> list[tuple[int, int]]:
        """``(rank, index of the segment on that rank)`` of every segment, in global position order."""
        found = [(seg.start, r, i) for r in range(self.size) for i, seg in enumerate(self._segments[r])]
        return [(r, i) for _, r, i in sorted(found)]

    def positions(self, device=None) -> torch.Tensor:
        """``[local_len]`` int64 global text positions of the local tokens."""
        return torch.cat([torch.arange(s.start, s.stop, device=device) for s in self.local])

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The local part of a global ``x`` (sequence along ``dim``)."""
        return torch.cat([x.narrow(dim, s.start, s.length) for s in self.local], dim)

    def unshard(self, parts: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The global tensor from every rank's local part (``parts[r]`` of rank r)."""
        pieces = [None] * (2 * self.size if self.kind == "zigzag" else self.size)
        for r, part in enumerate(parts):
            for s in self.segments_of(r):
                pieces[s.start // self.chunk] = part.narrow(dim, s.offset, s.length)
        return torch.cat(pieces, dim)
