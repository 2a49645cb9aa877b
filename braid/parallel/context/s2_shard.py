"""S2 context parallelism: every rank fetches only the K/V blocks its local queries' heads can see.

S2 (``braid.kernels.s2``) gives each head a strided shard of the context: the ``local_blocks`` most
recent blocks plus every ``vert_stride``-th older one, at a head-dependent residue. The queries of one
kv head (its GQA group) therefore touch the union of a few residues, and the other blocks that remote
ranks hold are never read. Pattern, layout, window and head counts are the same on every rank, so every
rank computes the whole exchange plan alike (``fetch_need``): no request round and no size exchange are
needed, one uneven all-to-all (``comm.AllToAllV``) per tensor kind moves the ``(kv head, key block)``
units — K and V in their dtype, the FoX cumulative gates of the group's query heads (fp32), the
document ids (one unit per block) — while the rank attends to its local keys.

Attention then runs as in ``ring.py``: one ``partial_attention`` per visible (query segment, key
segment) pair, partial results merged by fp32 log-sum-exp. A remote key segment is rebuilt from the
fetched units with zeros in the blocks no local query of that kv head sees; S2 masks exactly those,
so the zeros are never read. The backward recomputes every pair from the saved units (no second
fetch), returns fp32 dK/dV/dc of exactly the fetched units to their owners (the transpose of the
forward all-to-all, overlapped with the local pairs) and adds them there.

Granularity: ``model.s2.block`` tokens × one kv head; the per-rank chunk and the meta tokens must be
multiples of the block (as for ring + S2). Meta tokens are local on every rank and never travel.
Document ids do not prune the fetch: the plan depends on shapes only, not on data.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from braid.kernels.attention import resolve_backend
from braid.kernels.s2 import S2Pattern
from braid.kernels.self_check import cp_attention_signature
from braid.parallel.context.comm import AllToAllV
from braid.parallel.context.fox import global_forget_cumsum
from braid.parallel.context.layout import CPLayout
from braid.parallel.context.pairs import PairAttention, Seg, merge_partial, pair_backward, query_segments, text_rows
from braid.parallel.context.ring import ring_attention


@functools.lru_cache(maxsize=64)
def _need(seq_len: int, size: int, kind: str, meta: int, s2: S2Pattern, window: Optional[int], n_heads: int,
          n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    lay = CPLayout(seq_len, size, 0, kind)
    blk = s2.block
    if meta % blk or lay.chunk % blk:
        raise ValueError(f"context parallelism with S2: the meta tokens ({meta}) and the per-rank chunk "
                         f"({lay.chunk} tokens) must be multiples of model.s2.block = {blk}")
    if n_heads % n_kv_heads:
        raise ValueError(f"S2 context parallelism: n_heads ({n_heads}) must be a multiple of n_kv_heads "
                         f"({n_kv_heads})")
    nb, mb = seq_len // blk, meta // blk
    j = torch.arange(nb)
    owner = torch.empty(nb, dtype=torch.long)
    for r in range(size):
        for seg in lay.segments_of(r):
            owner[seg.start // blk: seg.stop // blk] = r
    group = n_heads // n_kv_heads
    by_residue: dict[int, set] = {}
    for h in range(n_heads):
        by_residue.setdefault(int(s2.residue(h, n_heads)), set()).add(h // group)
    need = torch.zeros(size, n_kv_heads, nb, dtype=torch.bool)
    for r in range(size):
        for res, kv_heads in by_residue.items():
            seen = torch.zeros(nb, dtype=torch.bool)
            for seg in lay.segments_of(r):
                i0, i1 = seg.start // blk, seg.stop // blk - 1
                # Distance (in blocks) from key block j to the nearest query block i ≥ j of the segment:
                # the local band and the window both favour the nearest one, the stride ignores it.
                d = (i0 - j).clamp(min=0)
                ok = (j <= i1) & ((d < s2.local_blocks) | ((mb + j + res) % s2.vert_stride == 0))
                if window is not None:  # smallest q − k over the two blocks: 0, or (d − 1)·block + 1
                    ok &= (d == 0) | ((d - 1) * blk + 1 < window)
                seen |= ok
            need[r, sorted(kv_heads)] |= seen
        need[r][:, owner == r] = False
    return need, owner


def fetch_need(layout: CPLayout, meta: int, s2: S2Pattern, window: Optional[int], n_heads: int,
               n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which remote key blocks every rank fetches.

    Returns ``need`` bool ``[cp, Hkv, T/block]`` (rank r's queries of kv head g see some key of text
    block j held by another rank; causality and window included, documents not) and ``owner`` int64
    ``[T/block]`` (the rank holding each text block). Head counts are those of the call (local heads
    under tensor parallelism: ``s2.head_start``/``s2.n_heads`` place them)."""
    need, owner = _need(layout.seq_len, layout.size, layout.kind, meta, s2, window, n_heads, n_kv_heads)
    return need.clone(), owner.clone()  # the cached plan stays intact whatever the caller does


def s2_fetch_bytes(layout: CPLayout, s2: S2Pattern, *, batch: int, n_heads: int, n_kv_heads: int, head_dim: int,
                   dtype_bytes: int, v_head_dim: Optional[int] = None, meta: int = 0, window: Optional[int] = None,
                   fox: bool = False, doc_bytes: int = 0) -> list[dict]:
    """Bytes one S2 attention call moves, per rank (index = rank in the cp group).

    Forward: K (``head_dim``) and V (``v_head_dim``, default ``head_dim``) units of ``batch × block``
    tokens in ``dtype_bytes``, with ``fox`` the fp32 gates of the unit's ``n_heads / n_kv_heads`` query
    heads, with ``doc_bytes`` (the doc ids' element size; 0 = no documents) one id per token of every
    fetched block. Backward: fp32 dK, dV (and dc) of every fetched unit back to its owner.
    Returns ``[{"fwd_send", "fwd_recv", "bwd_send", "bwd_recv"}]``, bytes as ints."""
    need, owner = fetch_need(layout, meta, s2, window, n_heads, n_kv_heads)
    dv = head_dim if v_head_dim is None else v_head_dim
    tokens = batch * s2.block
    gates = n_heads // n_kv_heads if fox else 0
    kv_unit = tokens * (head_dim + dv) * dtype_bytes + tokens * gates * 4
    grad_unit = tokens * (head_dim + dv + gates) * 4
    out = []
    for r in range(layout.size):
        mine = owner == r
        recv, recv_blocks = int(need[r].sum()), int(need[r].any(0).sum())
        send = int(need[:, :, mine].sum())
        send_blocks = int(need[:, :, mine].any(1).sum())
        out.append(dict(fwd_recv=recv * kv_unit + recv_blocks * tokens * doc_bytes,
                        fwd_send=send * kv_unit + send_blocks * tokens * doc_bytes,
                        bwd_send=recv * grad_unit, bwd_recv=send * grad_unit))
    return out


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """A remote text segment: its key segment (rebuilt tensors start at 0) and the fetched units in it:
    ``u`` (index in the received units), ``jl`` (block inside the segment), ``g`` (kv head), and the
    doc units ``ud``/``jd``."""

    seg: Seg
    u: torch.Tensor
    jl: torch.Tensor
    g: torch.Tensor
    ud: torch.Tensor
    jd: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One rank's side of the exchange: units it sends (local block ``send_lb``, kv head ``send_g``, in
    destination order) and receives (counts per peer), doc units likewise, the remote chunks."""

    blk: int
    send_lb: torch.Tensor
    send_g: torch.Tensor
    send_counts: tuple
    recv_counts: tuple
    doc_lb: torch.Tensor
    doc_send_counts: tuple
    doc_recv_counts: tuple
    chunks: tuple
    traffic: bool  # whether any rank sends anything (all ranks agree)


@functools.lru_cache(maxsize=64)
def _rank_plan(seq_len, size, kind, rank, meta, s2, window, n_heads, n_kv_heads) -> _Plan:
    need, owner = _need(seq_len, size, kind, meta, s2, window, n_heads, n_kv_heads)
    lay, blk = CPLayout(seq_len, size, rank, kind), s2.block
    local_block = torch.full_like(owner, -1)
    for seg in lay.local:
        local_block[seg.start // blk: seg.stop // blk] = torch.arange(seg.length // blk) + seg.offset // blk
    send_lb, send_g, send_counts, doc_lb, doc_counts = [], [], [], [], []
    for dst in range(size):
        # nonzero() lists (block, kv head) pairs sorted by block then head: the order both sides use.
        jg = (need[dst].T & (owner == rank)[:, None]).nonzero()
        send_lb.append(local_block[jg[:, 0]])
        send_g.append(jg[:, 1])
        send_counts.append(len(jg))
        jd = (need[dst].any(0) & (owner == rank)).nonzero()[:, 0]
        doc_lb.append(local_block[jd])
        doc_counts.append(len(jd))
    recv_j, recv_g, recv_counts, doc_j, doc_recv = [], [], [], [], []
    for src in range(size):
        jg = (need[rank].T & (owner == src)[:, None]).nonzero()
        recv_j.append(jg[:, 0])
        recv_g.append(jg[:, 1])
        recv_counts.append(len(jg))
        jd = (need[rank].any(0) & (owner == src)).nonzero()[:, 0]
        doc_j.append(jd)
        doc_recv.append(len(jd))
    recv_j, recv_g, doc_j = torch.cat(recv_j), torch.cat(recv_g), torch.cat(doc_j)
    chunks = []
    for src, i in lay.global_order():
        seg = lay.segments_of(src)[i]
        j0, j1 = seg.start // blk, seg.stop // blk
        u = ((recv_j >= j0) & (recv_j < j1)).nonzero()[:, 0]
        if src == rank or not len(u):
            continue
        ud = ((doc_j >= j0) & (doc_j < j1)).nonzero()[:, 0]
        chunks.append(_Chunk(Seg(meta + seg.start, 0, seg.length), u, recv_j[u] - j0, recv_g[u], ud, doc_j[ud] - j0))
    return _Plan(blk, torch.cat(send_lb), torch.cat(send_g), tuple(send_counts), tuple(recv_counts),
                 torch.cat(doc_lb), tuple(doc_counts), tuple(doc_recv), tuple(chunks), bool(need.any()))


def _units(x: torch.Tensor, lb: torch.Tensor, g: torch.Tensor, blk: int) -> torch.Tensor:
    """x ``[B, T, Hkv, *tail]`` → ``[N, B, blk, *tail]``: block ``lb[n]`` of kv head ``g[n]``."""
    b, t, h = x.shape[:3]
    return x.reshape(b, t // blk, blk, h, *x.shape[3:])[:, lb.to(x.device), :, g.to(x.device)]


def _place(units: torch.Tensor, lb: torch.Tensor, g: torch.Tensor, b: int, t: int, h: int, blk: int) -> torch.Tensor:
    """The transpose of ``_units``: ``[N, B, blk, *tail]`` summed into zeros ``[B, T, Hkv, *tail]``."""
    tail = units.shape[3:]
    acc = units.new_zeros(t // blk, h, b, blk, *tail)
    acc.index_put_((lb.to(units.device), g.to(units.device)), units, accumulate=True)
    return acc.permute(2, 0, 3, 1, *range(4, acc.dim())).reshape(b, t, h, *tail)


def _doc_units(doc: torch.Tensor, lb: torch.Tensor, blk: int) -> torch.Tensor:
    """doc ``[B, T]`` → ``[N, B, blk]`` (blocks ``lb``)."""
    return doc.reshape(doc.shape[0], -1, blk)[:, lb.to(doc.device)].transpose(0, 1)


def _split(flat: torch.Tensor, n: int, shapes: list) -> list[torch.Tensor]:
    """Flat ``[n · Σ numel(shape)]`` of per-unit concatenations → one ``[n, *shape]`` tensor per shape."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    parts = flat.view(n, sum(sizes)).split(sizes, 1)
    return [p.reshape(n, *s) for p, s in zip(parts, shapes)]


class _Fetch:
    """The forward exchange: posted by ``start`` (all-to-alls in flight), returned by ``wait`` as compact
    received units ``(k [U,B,blk,D], v [U,B,blk,Dv], c [U,B,blk,G] fp32 or None, doc [Ud,B,blk] or None)``."""

    def __init__(self, plan: _Plan, group):
        self.plan, self.group, self.moves = plan, group, []

    def start(self, k, v, c, doc, hkv: int) -> None:
        """k/v ``[B, T_loc, Hkv, D/Dv]``, c ``[B, T_loc, Hq]``, doc ``[B, T_loc]``: the local text rows."""
        p, b, blk = self.plan, k.shape[0], self.plan.blk
        self.shapes = [(b, blk, k.shape[-1]), (b, blk, v.shape[-1])]
        if not p.traffic:
            return
        if k.dtype != v.dtype:
            raise ValueError(f"S2 context parallelism: k ({k.dtype}) and v ({v.dtype}) must share a dtype")
        kv = torch.cat([_units(k, p.send_lb, p.send_g, blk).flatten(1),
                        _units(v, p.send_lb, p.send_g, blk).flatten(1)], 1)
        self._post(kv, p.send_counts, p.recv_counts, "s2.kv", self.shapes)
        if c is not None:
            cu = _units(c.unflatten(2, (hkv, -1)), p.send_lb, p.send_g, blk)
            self._post(cu.flatten(1), p.send_counts, p.recv_counts, "s2.fox", [cu.shape[1:]])
        if doc is not None:
            self._post(_doc_units(doc, p.doc_lb, blk).flatten(1), p.doc_send_counts, p.doc_recv_counts, "s2.doc",
                       [(b, blk)])

    def _post(self, rows, send_counts, recv_counts, label, shapes) -> None:
        width = sum(int(torch.Size(s).numel()) for s in shapes)
        xch = AllToAllV(self.group)
        xch.start(rows.reshape(-1), [n * width for n in send_counts], [n * width for n in recv_counts], label)
        self.moves.append((xch, sum(recv_counts), shapes))

    def wait(self, k, v, has_c: bool, has_doc: bool):
        if not self.moves:  # no rank needs anything remote (cp = 1, or a window shorter than a block)
            return k.new_zeros(0, *self.shapes[0]), v.new_zeros(0, *self.shapes[1]), None, None
        got = [_split(x.wait(), n, shapes) for x, n, shapes in self.moves]
        return got[0][0], got[0][1], got[1][0] if has_c else None, got[1 + has_c][0] if has_doc else None


def _rebuild(ch: _Chunk, units, b: int, hkv: int, blk: int):
    """A remote segment's ``(k, v, c, doc)`` from the fetched units, zeros (doc −1) where nothing came."""
    uk, uv, uc, ud = units
    nbc = ch.seg.length // blk

    def dense(x):
        out = x.new_zeros(b, nbc, blk, hkv, *x.shape[3:])
        out[:, ch.jl, :, ch.g] = x[ch.u]
        return out.flatten(1, 2)

    k, v = dense(uk), dense(uv)
    c = None if uc is None else dense(uc).flatten(2, 3)
    doc = None
    if ud is not None:
        doc = ud.new_full((b, nbc, blk), -1)
        doc[:, ch.jd] = ud[ch.ud].transpose(0, 1)
        doc = doc.flatten(1, 2)
    return k, v, c, doc


class _S2Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, doc, cfg: PairAttention, plan: _Plan):
        m, hkv, blk = cfg.meta, k.shape[2], plan.blk
        b, t, h, _ = q.shape
        fetch = _Fetch(plan, cfg.cps.group)
        fetch.start(k[:, m:], v[:, m:], text_rows(c, m), text_rows(doc, m), hkv)
        acc = torch.promote_types(q.dtype, torch.float32)
        o_acc = torch.zeros(b, t, h, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((b, h, t), float("-inf"), dtype=acc, device=q.device)
        qsegs = query_segments(cfg.cps)
        with torch.no_grad():
            # Local keys (meta + own text, the same segments as the queries) while the units travel.
            for ks in qsegs:
                for qs in qsegs:
                    if cfg.visible(qs, ks):
                        merge_partial(o_acc, lse, slice(qs.at, qs.at + qs.length),
                                      *cfg.pair(qs, ks, q, c, doc, k, v, c, doc))
            units = fetch.wait(k, v, c is not None, doc is not None)
            for ch in plan.chunks:
                kt = _rebuild(ch, units, b, hkv, blk)
                for qs in qsegs:
                    if cfg.visible(qs, ch.seg):
                        merge_partial(o_acc, lse, slice(qs.at, qs.at + qs.length),
                                      *cfg.pair(qs, ch.seg, q, c, doc, *kt))
        out = o_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, c, doc, out, lse, *units)
        ctx.cfg, ctx.plan = cfg, plan
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, c, doc, out, lse, *units = ctx.saved_tensors
        cfg, plan = ctx.cfg, ctx.plan
        m, hkv, blk = cfg.meta, k.shape[2], plan.blk
        b, t_loc = q.shape[0], q.shape[1] - m
        acc = lse.dtype
        d_out, out_f = d_out.to(acc), out.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        dc = None if c is None else torch.zeros(c.shape, dtype=acc, device=q.device)
        dck = None if c is None else torch.zeros(c.shape, dtype=acc, device=q.device)
        qsegs = query_segments(cfg.cps)
        # Remote segments first, so that their unit gradients travel home while the local pairs run.
        n_units = units[0].shape[0]
        d_units = [torch.zeros(x.shape, dtype=acc, device=q.device) for x in units[:3] if x is not None]
        for ch in plan.chunks:
            kt = _rebuild(ch, units, b, hkv, blk)
            grads = [torch.zeros(x.shape, dtype=acc, device=q.device) for x in kt[:3] if x is not None]
            for qs in qsegs:
                if cfg.visible(qs, ch.seg):
                    pair_backward(cfg, qs, ch.seg, q, c, doc, kt, d_out, out_f, lse, dq, dc, grads)
            if c is not None:
                grads[2] = grads[2].unflatten(2, (hkv, -1))
            for du, g in zip(d_units, grads):
                du[ch.u] = _units(g, ch.jl, ch.g, blk)
        back = None
        if plan.traffic:
            back = AllToAllV(cfg.cps.group)
            width = sum(int(x.shape[1:].numel()) for x in d_units)
            rows = torch.cat([x.flatten(1) for x in d_units], 1) if n_units else dq.new_zeros(0)
            back.start(rows.reshape(-1), [n * width for n in plan.recv_counts], [n * width for n in plan.send_counts],
                       "s2.dkv")
        for ks in qsegs:
            for qs in qsegs:
                if cfg.visible(qs, ks):
                    pair_backward(cfg, qs, ks, q, c, doc, (k, v, c, doc), d_out, out_f, lse, dq, dc,
                                   [dk, dv] + ([dck] if c is not None else []))
        if back is not None:
            shapes = [x.shape[1:] for x in units[:3] if x is not None]
            home = _split(back.wait(), len(plan.send_lb), shapes)
            dk[:, m:] += _place(home[0], plan.send_lb, plan.send_g, b, t_loc, hkv, blk)
            dv[:, m:] += _place(home[1], plan.send_lb, plan.send_g, b, t_loc, hkv, blk)
            if c is not None:
                dck[:, m:] += _place(home[2], plan.send_lb, plan.send_g, b, t_loc, hkv, blk).flatten(2, 3)
        dc = None if c is None else (dc + dck).to(c.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dc, None, None, None


def s2_attention(cps, q, k, v, *, scale=None, window=None, doc_ids=None, log_forget=None, s2=None,
                 backend: str = "auto") -> torch.Tensor:
    """Causal S2 attention of the local queries over the global sequence (see ``CPSeq.attention``),
    fetching only the key blocks the local queries' heads see; ``s2=None`` is dense: ring attention.

    q ``[B, M+T_loc, Hq, D]``, k/v ``[B, M+T_loc, Hkv, D/Dv]``, doc_ids ``[B, M+T_loc]``, log_forget
    ``[B, M+T_loc, Hq]`` (local gates). Returns ``[B, M+T_loc, Hq, Dv]`` in q's dtype."""
    if s2 is None:
        return ring_attention(cps, q, k, v, scale=scale, window=window, doc_ids=doc_ids, log_forget=log_forget,
                              backend=backend)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cfg = PairAttention(cps, scale, window, s2, resolve_backend(backend, q, "attention", cp_attention_signature(
        q, k, v, window, doc_ids, log_forget, s2)))
    lay = cps.layout
    plan = _rank_plan(lay.seq_len, lay.size, lay.kind, lay.rank, cps.meta, s2, window, q.shape[2], k.shape[2])
    c = None if log_forget is None else global_forget_cumsum(cps, log_forget)
    return _S2Attention.apply(q, k, v, c, doc_ids, cfg, plan)
