"""Every autograd-wrapped collective of braid: tensor, sequence, expert and context parallelism.

Megatron's ``tensor_parallel/mappings.py`` is the model: each op is a forward collective paired with
its transpose as the backward, named for the region a value moves between. Which backward a
collective needs depends on what consumes its output:

* a value every rank holds (replicated) that feeds rank-local, sharded computation gets only a
  partial gradient on each rank, so its backward is an all-reduce (``copy_to_region``, Megatron's f);
* a partial sum whose total feeds replicated computation (the same on every rank) gets the full
  gradient on every rank, so its backward is the identity (``reduce_from_region``, Megatron's g);
* a partial sum whose total feeds sharded computation again needs an all-reduce both ways
  (``all_reduce_sum``, e.g. a projection from split SSM channels to a few shared ones).

Sequence parallelism moves along dim 1 (time): ``scatter_to_sequence``, ``gather_from_sequence``
(backward reduce-scatter for sharded consumers, a slice for replicated ones) and
``reduce_scatter_to_sequence``. Packed projections and expert dispatch use ``all_to_all_rows``
(uneven splits over dim 0, backward the same exchange the other way); context parallelism's
equal-chunk ``all_to_all``, stacked ``all_gather``, ``reduce_to_owner`` and point-to-point
``exchange`` live here too. The collectives are ``all_reduce``, ``all_gather_into_tensor`` and
``reduce_scatter_tensor`` (``*_single`` from torch 2.13), ``all_to_all_single`` and P2P: all run on
NCCL and on gloo (CPU tests). On NCCL the sequence-parallel reduce-scatter is a true one, half the
traffic of an all-reduce on the critical path of every layer.

Counted: the context-parallel ops (and the raw ones they build on) add the bytes this rank sends
(by the algorithm's own formula) to ``COUNTER``, which ``bench/cp_comm.py`` and the CP tests read.
Conventions (bytes sent by one rank of a group of ``n``): all-gather of ``b`` bytes per rank:
``(n−1)·b``; all-reduce of ``b`` bytes: ``2·(n−1)/n·b`` (ring); all-to-all of ``b`` bytes in total:
``(n−1)/n·b``; point-to-point: the message. The tensor-parallel region ops are not counted.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------- byte counting and raw ops

class CommCounter:
    """Bytes sent by this rank, per label (e.g. ``"ring.kv"``), while ``enabled``."""

    def __init__(self):
        self.enabled = False
        self.bytes = defaultdict(int)

    def add(self, label: str, nbytes: float) -> None:
        if self.enabled:
            self.bytes[label] += int(round(nbytes))

    @contextmanager
    def counting(self):
        """Count inside the block, from zero; the totals stay readable afterwards."""
        self.bytes.clear()
        self.enabled = True
        try:
            yield self.bytes
        finally:
            self.enabled = False


COUNTER = CommCounter()


def nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


def all_reduce_(x: torch.Tensor, group, label: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place reduction (default: sum) over ``group`` (not differentiable)."""
    n = group_size(group)
    COUNTER.add(label, 2 * (n - 1) / n * nbytes(x))
    dist.all_reduce(x, op=op, group=group)
    return x


def all_reduce_max_(x: torch.Tensor, group, label: str) -> torch.Tensor:
    """In-place maximum over ``group`` (not differentiable)."""
    return all_reduce_(x, group, label, dist.ReduceOp.MAX)


def all_gather_raw(x: torch.Tensor, group, label: str) -> torch.Tensor:
    """``[n, *x.shape]``: every rank's ``x`` (not differentiable)."""
    n = group_size(group)
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(n)]
    COUNTER.add(label, (n - 1) * nbytes(x))
    dist.all_gather(out, x, group=group)
    return torch.stack(out)


# torch 2.13 renames all_gather_into_tensor and reduce_scatter_tensor (deprecated there, with a
# warning per process) to *_single; older torch (the GPU image's 2.11) has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def differentiable(name: str, forward: Callable, backward: Callable) -> Callable:
    """``forward(x, *args)`` as an autograd op whose backward is ``backward(grad, *args)``; ``args``
    (group, label, ...) get no gradient. The caller owns the math: ``backward`` must be the transpose
    of ``forward`` as the ranks' graphs use it. Returns the op's ``apply``."""

    def fwd(ctx, x, *args):
        ctx.args = args
        return forward(x, *args)

    def bwd(ctx, grad):
        return (backward(grad, *ctx.args), *(None,) * len(ctx.args))

    # Through the metaclass, so the graph shows ``<name>Backward`` rather than one shared name.
    op = type(torch.autograd.Function)(name, (torch.autograd.Function,),
                                       {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})
    return op.apply


# ---------------------------------------------------------------------------- tensor-parallel regions

def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _view(x: torch.Tensor, group) -> torch.Tensor:
    return x.view_as(x)


def _identity(g: torch.Tensor, group) -> torch.Tensor:
    return g


# Each is called ``op(x, group)``; the module docstring says which consumer needs which backward.
# Identity; backward all-reduces the gradient (replicated value → sharded consumers).
copy_to_region = differentiable("CopyToRegion", _view, _all_reduce)
# All-reduce (sum) of partial results; backward identity (the total feeds replicated compute).
reduce_from_region = differentiable("ReduceFromRegion", _all_reduce, _identity)


# ---------------------------------------------------------------------------- sequence parallelism (dim 1)

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



# ``[B, T/p, ...]`` → ``[B, T, ...]``; backward reduce-scatter (sequence parallel → TP region).
_gather_for_shard = differentiable("GatherFromSequence", _gather_seq, _reduce_scatter_seq)
# ``[B, T/p, ...]`` → ``[B, T, ...]`` for replicated compute: every rank already holds the whole
# gradient, so the backward only keeps the local chunk.
_gather_for_replicated = differentiable("GatherFromSequenceReplicated", _gather_seq, _slice_seq)
# Partial ``[B, T, ...]`` → summed ``[B, T/p, ...]`` chunk; backward all-gather (TP → SP region).
reduce_scatter_to_sequence = differentiable("ReduceScatterToSequence", _reduce_scatter_seq, _gather_seq)
# Replicated ``[B, T, ...]`` → this rank's ``[B, T/p, ...]``; backward all-gather.
scatter_to_sequence = differentiable("ScatterToSequence", _slice_seq, _gather_seq)


def gather_from_sequence(x: torch.Tensor, group, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """``[B, T/p, ...]`` → ``[B, T, ...]`` in rank order. The backward reduce-scatters the gradient
    when the gathered value feeds sharded (tensor-parallel) compute, whose gradients are partial;
    with ``tensor_parallel_output_grad=False`` (replicated compute, the whole gradient on every rank)
    it keeps the local chunk."""
    return (_gather_for_shard if tensor_parallel_output_grad else _gather_for_replicated)(x, group)


# ---------------------------------------------------------------------------- all-to-all over rows

def _all_to_all_rows(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _all_to_all_rows_back(g: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    # The transpose sends each gradient row back where its value came from.
    return _all_to_all_rows(g, in_splits, out_splits, group)


_all_to_all_rows_op = differentiable("AllToAllRows", _all_to_all_rows, _all_to_all_rows_back)


def all_to_all_rows(x: torch.Tensor, out_splits: list, in_splits: list, group) -> torch.Tensor:
    """``all_to_all_single`` over dim 0 with uneven splits: ``in_splits[r]`` rows of x go to rank r,
    ``out_splits[r]`` arrive from it (sources in rank order); backward the same exchange reversed."""
    return _all_to_all_rows_op(x, out_splits, in_splits, group)


# ---------------------------------------------------------------------------- packed projections

class PackedColumns:
    """Re-layout of a column-parallel projection whose output packs several blocks.

    The weight is an ordinary ``Shard`` (rank s computes the contiguous output columns
    ``[s·N/p, (s+1)·N/p)``), but rank r needs the columns ``wanted[r]`` (its slice of *every* block,
    e.g. ``[q | k | v | x | z]`` or an expert's ``[gate | up]``). One all-to-all over the
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
        return all_to_all_rows(cols, self.out_splits, self.in_splits, self.group).movedim(0, -1)


# ---------------------------------------------------------------------------- context-parallel shapes (counted)

def _reduce_scatter_grad(grad: torch.Tensor, group, label: str) -> torch.Tensor:
    # Every rank used every rank's x, so the gradient of mine is the sum over ranks of their
    # grad[mine]: a reduce-scatter, done as an all-to-all (gloo has none) that sends rank r its slice
    # of this rank's gradient, then summed here. (n−1)·|x| bytes, half of an all-reduce and slice.
    return torch.stack(all_to_all_raw(list(grad.unbind(0)), group, label + ".grad")).sum(0)


_all_gather = differentiable("AllGather", all_gather_raw, _reduce_scatter_grad)


def all_gather(x: torch.Tensor, group, label: str = "all_gather") -> torch.Tensor:
    """Differentiable ``[n, *x.shape]`` all-gather; backward a reduce-scatter (as an all-to-all):
    ``(n−1)·|x|`` bytes each way.

    Its backward is a collective: the output must reach the loss on EVERY rank (use the whole gathered
    tensor, e.g. a scan over all of it, then select), or the ranks whose graph skips it hang the rest."""
    return _all_gather(x, group, label)


def all_to_all_raw(chunks: Sequence[torch.Tensor], group, label: str) -> list[torch.Tensor]:
    """Send ``chunks[r]`` to rank r; return what every rank sent here (shapes must match pairwise:
    here every chunk has the same shape)."""
    n = group_size(group)
    x = torch.stack([c.contiguous() for c in chunks])
    out = torch.empty_like(x)
    COUNTER.add(label, (n - 1) / n * nbytes(x))
    dist.all_to_all_single(out, x, group=group)
    return list(out.unbind(0))


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, label, *chunks):
        ctx.group, ctx.label = group, label
        return tuple(all_to_all_raw(chunks, group, label))

    @staticmethod
    def backward(ctx, *grads):
        # The transpose of an all-to-all is an all-to-all the other way.
        back = all_to_all_raw([g.contiguous() for g in grads], ctx.group, ctx.label + ".grad")
        return (None, None, *back)


def all_to_all(chunks: Sequence[torch.Tensor], group, label: str = "all_to_all") -> list[torch.Tensor]:
    """Differentiable all-to-all of equal-shape chunks: ``out[r]`` is what rank r sent to this rank."""
    return list(_AllToAll.apply(group, label, *chunks))


def _reduce_levels(x: torch.Tensor, group, levels, label: str) -> torch.Tensor:
    x = x.contiguous().clone()
    for g in levels:
        all_reduce_(x, g, label)
    return x[group_rank(group)].clone()


def _gather_slice_grads(grad: torch.Tensor, group, levels, label: str) -> torch.Tensor:
    # Rank r kept only slice r of the sum, so every rank's input gets every rank's slice gradient.
    return all_gather_raw(grad.contiguous(), group, label + ".grad")


_reduce_to_owner = differentiable("ReduceToOwner", _reduce_levels, _gather_slice_grads)


def reduce_to_owner(x: torch.Tensor, group, levels: Sequence, label: str = "reduce") -> torch.Tensor:
    """Differentiable: ``x [n, ...]`` summed over ``group`` by all-reduces over ``levels`` (process
    groups whose successive sums give the group's sum, e.g. within nodes then across), returning this
    rank's slice ``[...]``. Backward: an all-gather of the slice gradients."""
    return _reduce_to_owner(x, group, tuple(levels), label)


def exchange_raw(sends: dict, recvs: dict, group, label: str) -> dict:
    """Point-to-point: send ``sends[peer]`` (a tensor) to each peer and receive into fresh tensors
    for ``recvs = {peer: (shape, dtype, device)}``; peers are ranks of ``group``, never this rank.
    Returns ``{peer: received}``. Not differentiable."""
    ranks = dist.get_process_group_ranks(group)
    out = {p: torch.empty(shape, dtype=dtype, device=dev) for p, (shape, dtype, dev) in recvs.items()}
    ops = []
    for p, x in sends.items():
        x = x.contiguous()
        COUNTER.add(label, nbytes(x))
        ops.append(dist.P2POp(dist.isend, x, ranks[p], group))
    ops += [dist.P2POp(dist.irecv, out[p], ranks[p], group) for p in out]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return out


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, label, send_peers, recv_spec, anchor, *send_tensors):
        ctx.group, ctx.label, ctx.send_peers = group, label, send_peers
        ctx.send_spec = {p: (x.shape, x.dtype, x.device) for p, x in zip(send_peers, send_tensors)}
        ctx.recv_peers = [p for p, _ in recv_spec]
        got = exchange_raw(dict(zip(send_peers, send_tensors)), dict(recv_spec), group, label)
        return (anchor.new_zeros(0), *[got[p] for p in ctx.recv_peers])

    @staticmethod
    def backward(ctx, _, *grads):
        # The transpose: each received tensor's gradient goes back to its sender.
        back = {p: g.contiguous() for p, g in zip(ctx.recv_peers, grads)}
        got = exchange_raw(back, ctx.send_spec, ctx.group, ctx.label + ".grad")
        return (None, None, None, None, None, *[got[p] for p in ctx.send_peers])


def exchange(anchor: torch.Tensor, sends: dict, recvs: dict, group, label: str = "p2p"):
    """Differentiable point-to-point exchange (``exchange_raw``'s ``sends``/``recvs``).

    Returns ``(tie, {peer: received})``. ``anchor`` is a tensor of this rank that requires grad
    whenever any rank's exchange does (e.g. the tensor the sends are cut from), and ``tie`` an empty
    tensor the caller adds (summed) to its result: so the backward exchange runs on every rank,
    also on one that receives nothing but must answer its senders."""
    send_peers = sorted(sends)
    recv_spec = tuple(sorted(recvs.items()))
    out = _Exchange.apply(group, label, tuple(send_peers), recv_spec, anchor, *[sends[p] for p in send_peers])
    return out[0], dict(zip([p for p, _ in recv_spec], out[1:]))


def _sum(x: torch.Tensor, group, label: str) -> torch.Tensor:
    return all_reduce_(x.contiguous().clone(), group, label)


def _sum_grad(grad: torch.Tensor, group, label: str) -> torch.Tensor:
    # Every rank's output is the sum: each input gets the sum of all ranks' output gradients.
    return _sum(grad, group, label + ".grad")


_all_reduce_sum = differentiable("AllReduceSum", _sum, _sum_grad)


def all_reduce_sum(x: torch.Tensor, group, label: str = "all_reduce") -> torch.Tensor:
    """Differentiable sum over ``group`` (backward: the sum of the gradients). Like ``all_gather``, its
    output must reach the loss on every rank."""
    return _all_reduce_sum(x, group, label)

