"""Context-parallel collectives, differentiable where the model needs gradients through them, and
counted: every call adds the bytes this rank sends (by the algorithm's own formula) to ``COUNTER``,
which ``bench/cp_comm.py`` reads.

Counting conventions (bytes sent by one rank of a group of ``n``):
all-gather of ``b`` bytes per rank: ``(n−1)·b``; all-reduce of ``b`` bytes: ``2·(n−1)/n·b`` (ring);
all-to-all of ``b`` bytes in total: ``(n−1)/n·b``; point-to-point: the message.

``differentiable`` pairs a forward collective with its transpose; ``tp_plans/comm.py`` builds its
(uncounted) tensor-parallel collectives with it too.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


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


class RingP2P:
    """Asynchronous send to the next rank and receive from the previous one of a ring (``direction``
    +1) or the other way (−1). ``start`` posts the transfer; ``wait`` returns the received tensors,
    so the caller computes on the current block while the next one travels."""

    def __init__(self, group, direction: int = 1):
        self.group = group
        self.n, self.rank = group_size(group), group_rank(group)
        ranks = dist.get_process_group_ranks(group)
        self.next = ranks[(self.rank + direction) % self.n]
        self.prev = ranks[(self.rank - direction) % self.n]
        self._pending: Optional[tuple[list, list]] = None

    def start(self, tensors: Sequence[torch.Tensor], label: str) -> None:
        sends = [t.contiguous() for t in tensors]
        recvs = [torch.empty_like(t) for t in sends]
        ops = []
        for s, r in zip(sends, recvs):
            COUNTER.add(label, nbytes(s))
            ops.append(dist.P2POp(dist.isend, s, self.next, self.group))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group))
        self._pending = (dist.batch_isend_irecv(ops), recvs, sends)

    def wait(self) -> list[torch.Tensor]:
        reqs, recvs, _ = self._pending
        for req in reqs:
            req.wait()
        self._pending = None
        return recvs


class AllToAllV:
    """Uneven all-to-all of one flat tensor, posted asynchronously so the caller computes meanwhile.

    ``start(x, send_splits, recv_splits, label)``: ``x`` is 1-D, its first ``send_splits[0]`` elements
    go to rank 0, the next ``send_splits[1]`` to rank 1, …; ``recv_splits[r]`` elements arrive from
    rank r (both sides must agree, e.g. from a plan every rank computes alike). Counts the bytes sent
    to the other ranks (the part addressed to this rank itself does not travel). ``wait()`` returns the
    received 1-D tensor, sources in rank order."""

    def __init__(self, group):
        self.group, self.rank = group, group_rank(group)
        self._pending = None

    def start(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], label: str) -> None:
        x = x.contiguous()
        if x.dim() != 1 or x.numel() != sum(send_splits):
            raise ValueError(f"AllToAllV: x must be 1-D with sum(send_splits) = {sum(send_splits)} elements, "
                             f"got shape {tuple(x.shape)}")
        out = x.new_empty(sum(recv_splits))
        COUNTER.add(label, (sum(send_splits) - send_splits[self.rank]) * x.element_size())
        work = dist.all_to_all_single(out, x, list(recv_splits), list(send_splits), group=self.group,
                                      async_op=True)
        self._pending = (work, out, x)

    def wait(self) -> torch.Tensor:
        work, out, _ = self._pending
        work.wait()
        self._pending = None
        return out


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
