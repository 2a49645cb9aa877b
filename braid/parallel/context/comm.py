"""Context-parallel communication that has no tensor-parallel twin: the ring's asynchronous
point-to-point and the uneven asynchronous all-to-all (not differentiable). Every autograd-wrapped
collective, the byte counter and the raw ops they build on live in :mod:`braid.parallel.collectives`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

# COUNTER (read by the CP tests and bench) and the group helpers, under their old address.
from braid.parallel.collectives import COUNTER, group_rank, group_size, nbytes  # noqa: F401


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
