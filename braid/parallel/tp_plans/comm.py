"""Differentiable collectives over a tensor-parallel group (Megatron's f / g operators and friends).

Which backward a collective needs depends on what consumes its output:

* a value every rank holds (replicated) that feeds rank-local, sharded computation gets only a
  partial gradient on each rank, so its backward is an all-reduce (``copy_to_tp``);
* a partial sum whose total feeds replicated computation (the same on every rank) gets the full
  gradient on every rank, so its backward is the identity (``reduce_from_tp``);
* a partial sum whose total feeds sharded computation again needs an all-reduce both ways
  (``all_reduce_both``, e.g. Hymba's ``x_proj`` over sharded SSM channels).

The sequence-parallel variants gather / scatter along dim 1 (time). Only ``all_reduce``,
``all_gather_into_tensor`` and (packed projections) ``all_to_all_single`` are used: all run on gloo
(CPU tests) and NCCL. Reduce-scatter is an
all-reduce plus a slice, which gloo supports everywhere; on NCCL this costs ~2× a reduce-scatter's
traffic (noted for the GPU work).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, T/p, ...]`` per rank → ``[B, T, ...]`` in rank order."""
    p = dist.get_world_size(group)
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((p * xt.shape[0],) + tuple(xt.shape[1:]))
    dist.all_gather_into_tensor(out, xt, group=group)
    return out.transpose(0, 1).contiguous()


def _slice_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, T, ...]`` → this rank's ``[B, T/p, ...]`` chunk."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(p, dim=1)[r].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceBoth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _GatherSeqForShard(torch.autograd.Function):
    """Forward all-gather (time); backward reduce-scatter: the consumer is sharded computation."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _slice_seq(_all_reduce(g, ctx.group), ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """Forward reduce-scatter of partial sums (time); backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice_seq(_all_reduce(x, group), group)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g, ctx.group), None


class _SplitSeq(torch.autograd.Function):
    """Forward: keep this rank's time chunk of a replicated tensor; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g, ctx.group), None


class _GatherSeqForReplicated(torch.autograd.Function):
    """Forward all-gather (time); backward keeps this rank's chunk: the consumer is replicated."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _slice_seq(g, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity; backward all-reduces the gradient (replicated value → sharded consumers)."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) of partial results; backward identity (the total feeds replicated compute)."""
    return _ReduceFromTP.apply(x, group)


def all_reduce_both(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) forward and backward (the total feeds sharded compute again)."""
    return _AllReduceBoth.apply(x, group)


def gather_seq_for_shard(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, T/p, ...]`` → ``[B, T, ...]``; backward reduce-scatter (sequence parallel → TP region)."""
    return _GatherSeqForShard.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Partial ``[B, T, ...]`` → summed ``[B, T/p, ...]`` chunk; backward all-gather (TP → SP region)."""
    return _ReduceScatterSeq.apply(x, group)


def split_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated ``[B, T, ...]`` → this rank's ``[B, T/p, ...]``; backward all-gather."""
    return _SplitSeq.apply(x, group)


def gather_seq_for_replicated(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, T/p, ...]`` → ``[B, T, ...]`` for replicated compute; backward keeps the local chunk."""
    return _GatherSeqForReplicated.apply(x, group)


# ---------------------------------------------------------------------------- packed projections

class _AllToAllRows(torch.autograd.Function):
    """``all_to_all_single`` on dim 0 with given splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        grad = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(grad, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad, None, None, None


class PackedColumns:
    """Re-layout of a column-parallel projection whose output packs several blocks.

    The weight is an ordinary ``Shard`` (rank s computes the contiguous output columns
    ``[s·N/p, (s+1)·N/p)``), but rank r needs the columns ``wanted[r]`` (its slice of *every* block,
    e.g. Hymba's ``[q | k | v | x | z]`` or an expert's ``[gate | up]``). One all-to-all over the
    feature dim moves each column to the rank that needs it (backward: the inverse all-to-all).
    Traffic per rank: the (p−1)/p of its local output that belongs elsewhere. Keeping the packed
    parameter a plain ``Shard`` is what lets FSDP2 and DCP treat it like every other TP weight.
    """

    def __init__(self, wanted: list[torch.Tensor], n_cols: int, group):
        p, r = len(wanted), dist.get_rank(group)
        chunk = n_cols // p
        self.group = group
        mine = r * chunk
        # What this rank sends to each destination: its own columns that the destination wants.
        self.send = [w[(w >= mine) & (w < mine + chunk)] - mine for w in wanted]
        self.in_splits = [len(s) for s in self.send]
        # What arrives: my wanted columns, source-major. Sources own increasing column ranges and
        # ``wanted[r]`` is increasing, so source-major order is already ``wanted[r]``'s order.
        assert bool((wanted[r][1:] > wanted[r][:-1]).all()), "wanted columns must be increasing"
        self.out_splits = [len(wanted[r][(wanted[r] >= s * chunk) & (wanted[r] < (s + 1) * chunk)])
                           for s in range(p)]
        self.send_idx = torch.cat(self.send)

    @classmethod
    def blocks(cls, sizes: list[int], group) -> "PackedColumns":
        """Rank r wants the r-th 1/p of every block of ``sizes`` (each divisible by p)."""
        p = dist.get_world_size(group)
        wanted = []
        for r in range(p):
            cols, start = [], 0
            for size in sizes:
                cols.append(torch.arange(start + r * (size // p), start + (r + 1) * (size // p)))
                start += size
            wanted.append(torch.cat(cols))
        return cls(wanted, sum(sizes), group)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """``[..., N/p]`` this rank's contiguous columns → ``[..., len(wanted[r])]``."""
        if self.send_idx.device != y.device:
            self.send_idx = self.send_idx.to(y.device)
        cols = y.movedim(-1, 0).index_select(0, self.send_idx)
        return _AllToAllRows.apply(cols, self.out_splits, self.in_splits, self.group).movedim(0, -1)
