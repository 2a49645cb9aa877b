"""What an MoE layer under context parallelism needs of the whole sequence (``MoE.sequence_parallel``,
set by :func:`braid.parallel.context.apply_cp`): its balance statistics summed over the cp ranks, and,
for capacity, how many token–expert pairs each expert got in the text segments that precede each
local one, so that capacity and drop order are those of cp = 1 (capacity per sequence is then
independent of the layout, as Megatron users expect)."""

from __future__ import annotations

import torch

from braid.parallel.collectives import all_gather_raw, all_reduce_sum
from braid.parallel.context.context import ContextParallel


class MoESequence:
    """``meta``: meta tokens at the front of every rank's rows (replicated, counted once); ``parts``:
    the cp size (a rank's text is ``1/parts`` of the sequence)."""

    def __init__(self, cp: ContextParallel, meta: int):
        self.cp, self.meta, self.parts = cp, meta, cp.size

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over the cp ranks (every rank's output must reach its loss)."""
        return all_reduce_sum(x, self.cp.group, label="moe.balance")

    def segments(self, text_len: int) -> list[int]:
        """Lengths of this rank's text segments, in local (= global) order, when it holds ``text_len``
        text tokens per row."""
        return [s.length for s in self.cp.layout(text_len * self.parts).local]

    def earlier(self, counts: torch.Tensor, text_len: int) -> torch.Tensor:
        """``counts [S, E]`` pairs per expert in each local text segment (summed over rows) → ``[S, E]``
        the pairs per expert in every rank's text segments before each local one (not differentiable)."""
        layout = self.cp.layout(text_len * self.parts)
        every = all_gather_raw(counts, self.cp.group, "moe.capacity")  # [parts, S, E]
        order = layout.global_order()
        ordered = torch.stack([every[r, i] for r, i in order])
        before = ordered.cumsum(0) - ordered
        return before[[order.index((self.cp.rank, i)) for i in range(counts.shape[0])]]
