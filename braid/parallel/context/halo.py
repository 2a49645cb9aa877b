"""Halo exchange: the few tokens before each local segment, for ops that read a short causal window
(short convolutions, token shift) and for the document-start test of the state passing.

A rank's local tensor is ``[B, M + T_loc, ...]`` (meta tokens, then its segments in global order).
The ``n``-token halo of a segment starting at global text position ``s`` is positions ``s−n..s−1`` of
the cp = 1 sequence ``[meta, text]``: text rows from whichever rank holds them, meta rows (every rank
has them) for ``s − n < 0``, zero rows (doc id −1) before the meta tokens.

Exchange: point-to-point (``comm.exchange``): every rank works out, from the layout alone, which
of its rows each other rank's halos hold and sends exactly those (usually to one or two neighbours:
zigzag's second segment reads from the rank after); the backward sends the halo rows' gradients
back to their owners.

``local_mix(cps, fn, n, *xs)`` runs ``fn`` once per local segment on ``[meta, halo, segment]``
(segments stacked along the batch dimension) and keeps the meta rows of the first piece and the
segment rows of every piece, which equals ``fn`` over the whole sequence whenever an output row
depends only on its own row, the ``n`` rows before it and the meta rows.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from braid.parallel.collectives import exchange, exchange_raw
from braid.parallel.context.layout import CPLayout


def _segments(cps):
    return cps.layout.local, cps.layout.chunk


@functools.lru_cache(maxsize=256)
def _plan(seq_len: int, size: int, rank: int, kind: str, meta: int, n: int):
    """Who sends what for the ``n``-token halos, from the layout alone (every rank derives the same).

    Returns ``sends`` ``((dst, local text rows), ...)``, ``recvs`` ``((src, count), ...)`` and
    ``index``: for every (local segment, halo row), its row in the table ``[pad | meta | local text |
    received rows by src]``."""
    lays = [CPLayout(seq_len, size, r, kind) for r in range(size)]
    owner = {}  # global text position → (rank, local text index)
    for r, lay in enumerate(lays):
        for s in lay.local:
            owner.update({p: (r, s.offset + p - s.start) for p in range(s.start, s.stop)})

    def needs(r: int) -> list[int]:  # the text positions of r's halos, each once, in order
        return list(dict.fromkeys(p for s in lays[r].local for p in range(max(0, s.start - n), s.start)))

    sends = tuple((dst, tuple(owner[p][1] for p in needs(dst) if owner[p][0] == rank))
                  for dst in range(size) if dst != rank)
    from_src: dict = {}
    for p in needs(rank):
        if owner[p][0] != rank:
            from_src.setdefault(owner[p][0], []).append(p)
    where, base = {}, 1 + meta + lays[rank].local_len
    for src in sorted(from_src):
        where.update({p: base + k for k, p in enumerate(from_src[src])})
        base += len(from_src[src])
    index = []
    for s in lays[rank].local:
        for p in range(s.start - n, s.start):
            if p >= 0:
                index.append(1 + meta + owner[p][1] if owner[p][0] == rank else where[p])
            else:  # a meta row, or zero padding before the meta tokens
                index.append(1 + meta + p if p >= -meta else 0)
    return (tuple((d, rows) for d, rows in sends if rows),
            tuple((src, len(ps)) for src, ps in sorted(from_src.items())), tuple(index))


def halo(cps, x: torch.Tensor, n: int) -> torch.Tensor:
    """x ``[B, M+T_loc, *R]`` (float: differentiable; integer doc ids: pad −1) → ``[B, nseg, n, *R]``.

    Each rank sends exactly the rows other ranks' halos hold (point-to-point, through comm.py);
    rows this rank holds itself (zigzag: the last rank's two adjacent chunks) are read in place."""
    m, segs = cps.meta, cps.layout.local
    b, rest = x.shape[0], x.shape[2:]
    if n == 0:
        return x.new_zeros(b, len(segs), 0, *rest)
    lay = cps.layout
    sends, recvs, index = _plan(lay.seq_len, lay.size, lay.rank, lay.kind, m, n)
    send = {dst: x[:, m + torch.tensor(rows, device=x.device)] for dst, rows in sends}
    recv = {src: ((b, count, *rest), x.dtype, x.device) for src, count in recvs}
    if x.is_floating_point():
        tie, got = exchange(x, send, recv, cps.group, "halo")
        pad = x.new_zeros(b, 1, *rest)
    else:
        tie, got = None, exchange_raw(send, recv, cps.group, "halo.doc")
        pad = x.new_full((b, 1, *rest), -1)
    table = torch.cat([pad, x] + [got[src] for src, _ in recvs], 1)
    out = table[:, torch.tensor(index, device=x.device)].view(b, len(segs), n, *rest)
    return out if tie is None else out + tie.sum()


def with_halo(cps, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x ``[B, M+T_loc, *R]``, its halo ``[B, nseg, n, *R]`` → pieces ``[nseg·B, M+n+L, *R]`` (segment-major)."""
    m, (segs, _) = cps.meta, _segments(cps)
    pieces = [torch.cat([x[:, :m], h[:, i], x[:, m + s.offset: m + s.offset + s.length]], 1)
              for i, s in enumerate(segs)]
    return torch.stack(pieces, 0).flatten(0, 1)


def drop_halo(cps, y: torch.Tensor, n: int) -> torch.Tensor:
    """Pieces ``[nseg·B, M+n+L, *R]`` → local ``[B, M+T_loc, *R]``: the first piece's meta rows, then
    each piece's segment rows."""
    m, (segs, _) = cps.meta, _segments(cps)
    y = y.unflatten(0, (len(segs), -1))
    return torch.cat([y[0, :, :m]] + [y[i, :, m + n:] for i in range(len(segs))], 1)


def local_mix(cps, fn: Callable, n: int, *xs: Optional[torch.Tensor]):
    """``fn(*xs)`` as on the whole sequence, for an ``fn`` whose rows read at most ``n`` rows back
    (plus the meta rows). ``xs``: ``[B, M+T_loc, ...]`` tensors or None (passed through); float
    tensors of one dtype share one exchange. Returns what ``fn`` returns (a tensor or a tuple),
    each ``[B, M+T_loc, ...]``."""
    halos: list = [None] * len(xs)
    groups: dict = {}
    for j, x in enumerate(xs):
        if x is None:
            continue
        if x.is_floating_point():
            groups.setdefault(x.dtype, []).append(j)
        else:
            halos[j] = halo(cps, x, n)
    for js in groups.values():
        flat = [xs[j].flatten(2) for j in js]
        h = halo(cps, torch.cat(flat, -1), n)
        for j, part in zip(js, h.split([f.shape[-1] for f in flat], -1)):
            halos[j] = part.unflatten(-1, xs[j].shape[2:])
    pieces = [None if x is None else with_halo(cps, x, h) for x, h in zip(xs, halos)]
    out = fn(*pieces)
    if isinstance(out, tuple):
        return tuple(drop_halo(cps, y, n) for y in out)
    return drop_halo(cps, out, n)


def segment_starts(cps, doc_ids: Optional[torch.Tensor], batch: int, device=None) -> torch.Tensor:
    """``[B, nseg]`` bool: the segment's first token starts a document (its id differs from the
    previous token's in ``[meta, text]``, meta ids being −1) or the whole sequence (no token before)."""
    m, (segs, _) = cps.meta, _segments(cps)
    first = torch.tensor([s.start == 0 and m == 0 for s in segs], device=device).expand(batch, -1)
    if doc_ids is None:
        return first
    prev = halo(cps, doc_ids, 1)[:, :, 0]
    own = torch.stack([doc_ids[:, m + s.offset] for s in segs], 1)
    return first | (own != prev)


def halo_comm_bytes(layout: CPLayout, meta: int, n: int, batch: int, channels: int,
                    dtype_bytes: int) -> dict[str, int]:
    """Bytes one rank sends for the ``n``-row halos of ``channels`` features: ``halo``, the rows of this
    rank other ranks' segments need; ``halo.grad``, the gradients of the rows it received, sent back."""
    sends, recvs, _ = _plan(layout.seq_len, layout.size, layout.rank, layout.kind, meta, n)
    row = batch * channels * dtype_bytes
    return {"halo": sum(len(rows) for _, rows in sends) * row, "halo.grad": sum(c for _, c in recvs) * row}
