"""Differentiable collectives over a tensor-parallel group (Megatron's f / g operators and friends).

Which backward a collective needs depends on what consumes its output:

* a value every rank holds (replicated) that feeds rank-local, sharded computation gets only a
  partial gradient on each rank, so its backward is an all-reduce (``copy_to_tp``);
* a partial sum whose total feeds replicated computation (the same on every rank) gets the full
  gradient on every rank, so its backward is the identity (``reduce_from_tp``);
* a partial sum whose total feeds sharded computation again needs an all-reduce both ways
  (``all_reduce_both``, e.g. Hymba's ``x_proj`` over sharded SSM channels).

The sequence-parallel variants gather / scatter along dim 1 (time). The collectives are
``all_reduce``, ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (``*_single`` from torch 2.13)
and (packed projections) ``all_to_all_single``: all run on NCCL and on gloo (CPU tests). On NCCL the sequence-parallel
reduce-scatter is a true one, half the traffic of an all-reduce on the critical path of every layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Only the op pattern is shared: context.comm's collectives count their bytes in COUNTER (what the CP
# tests and bench measure) and gather along a new leading dim, where these gather along time.
from braid.parallel.context.comm import differentiable

# torch 2.13 renames all_gather_into_tensor and reduce_scatter_tensor (deprecated there, with a
# warning per process) to *_single; older torch (the GPU image's 2.11) has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, T/p, ...]`` per rank → ``[B, T, ...]`` in rank order."""
    p = dist.get_world_size(group)
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((p * xt.shape[0],) + tuple(xt.shape[1:]))
    _all_gather_single(out, xt, group=group)
    return out.transpose(0, 1).contiguous()


def _slice_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, T, ...]`` → this rank's ``[B, T/p, ...]`` chunk."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(p, dim=1)[r].contiguous()


def _view(x: torch.Tensor, group) -> torch.Tensor:
    return x.view_as(x)


def _identity(g: torch.Tensor, group) -> torch.Tensor:
    return g




def _reduce_scatter_seq(x: torch.Tensor, group, native: bool | None = None) -> torch.Tensor:
    """Partial ``[B, T, ...]`` per rank → this rank's ``[B, T/p, ...]`` chunk of the sum.

    ``native`` (default: on NCCL) is a true reduce-scatter, (p−1)/p of x each way. Elsewhere an
    all-reduce and a slice: gloo's reduce-scatter is that same all-reduce, on a transposed copy whose
    different summation order would only move the CPU tests' rounding."""
    if native is None:
        native = dist.get_backend(group) == "nccl"
    if not native:
        return _slice_seq(_all_reduce(x, group), group)
    p = dist.get_world_size(group)
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((xt.shape[0] // p,) + tuple(xt.shape[1:]))
    _reduce_scatter_single(out, xt, op=dist.ReduceOp.SUM, group=group)
    return out.transpose(0, 1).contiguous()


# Each is called ``op(x, group)``; the module docstring says which consumer needs which backward.
# Identity; backward all-reduces the gradient (replicated value → sharded consumers).
copy_to_tp = differentiable("CopyToTP", _view, _all_reduce)
# All-reduce (sum) of partial results; backward identity (the total feeds replicated compute).
reduce_from_tp = differentiable("ReduceFromTP", _all_reduce, _identity)
# All-reduce (sum) forward and backward (the total feeds sharded compute again).
all_reduce_both = differentiable("AllReduceBoth", _all_reduce, _all_reduce)
# ``[B, T/p, ...]`` → ``[B, T, ...]``; backward reduce-scatter (sequence parallel → TP region).
gather_seq_for_shard = differentiable("GatherSeqForShard", _gather_seq, _reduce_scatter_seq)
# Partial ``[B, T, ...]`` → summed ``[B, T/p, ...]`` chunk; backward all-gather (TP → SP region).
reduce_scatter_seq = differentiable("ReduceScatterSeq", _reduce_scatter_seq, _gather_seq)
# Replicated ``[B, T, ...]`` → this rank's ``[B, T/p, ...]``; backward all-gather.
split_seq = differentiable("SplitSeq", _slice_seq, _gather_seq)
# ``[B, T/p, ...]`` → ``[B, T, ...]`` for replicated compute: every rank already holds the whole
# gradient, so the backward only keeps the local chunk.
gather_seq_for_replicated = differentiable("GatherSeqForReplicated", _gather_seq, _slice_seq)


# ---------------------------------------------------------------------------- packed projections

def _all_to_all_rows(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _all_to_all_rows_back(g: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    # The transpose sends each gradient row back where its value came from.
    return _all_to_all_rows(g, in_splits, out_splits, group)


_all_to_all_rows_op = differentiable("AllToAllRows", _all_to_all_rows, _all_to_all_rows_back)


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
        return _all_to_all_rows_op(cols, self.out_splits, self.in_splits, self.group).movedim(0, -1)
