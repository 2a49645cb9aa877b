"""Differentiable collectives over a tensor-parallel group (Megatron's f / g operators and friends).

Which backward a collective needs depends on what consumes its output:

* a value every rank holds (replicated) that feeds rank-local, sharded computation gets only a
  partial gradient on each rank, so its backward is an all-reduce (``copy_to_tp``);
* a partial sum whose total feeds replicated computation (the same on every rank) gets the full
  gradient on every rank, so its backward is the identity (``reduce_from_tp``);
* a partial sum whose total feeds sharded computation again needs an all-reduce both ways
  (``all_reduce_both``, e.g. Hymba's ``x_proj`` over sharded SSM channels).

The sequence-parallel variants gather / scatter along dim 1 (time). Only ``all_reduce`` and
``all_gather_into_tensor`` are used: both run on gloo (CPU tests) and NCCL. Reduce-scatter is an
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
