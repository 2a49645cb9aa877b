"""Ring attention: K/V blocks travel around the context-parallel ring while each rank attends its
local queries to the block it holds; partial results are merged by their fp32 log-sum-exp.

Forward: step 0 attends to the local keys (meta tokens included: they never travel, every rank has
them), then ``cp − 1`` steps each send the current text K/V packet to the next rank (asynchronously,
overlapped with the computation on it) and attend to the packet received from the previous one.
Backward re-circulates K/V the same way with fp32 dK/dV accumulators travelling alongside; after
``cp`` hops the accumulators are home. Memory stays O(local sequence) on every rank.

Each (query segment, key segment) pair is one ``partial_attention`` call at relative positions
(``q_offset`` = query start − key start), so the kernels need no notion of CP: sinks exist only in the
meta segment (at position 0) and the S2 residues are shifted by the key segment's block index.
Pairs that no query can see (causal, window) are skipped, which is what zigzag balances.

The backward of a pair recomputes its ``(o_b, lse_b)`` and back-propagates
``(w_b·dO, w_b·(dO·(o_b − o)))`` with ``w_b = exp(lse_b − lse)``: exactly the pair's share of the
gradient of the merged output, for either kernel backend.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from braid.kernels.attention import resolve_backend
from braid.kernels.attention_blocked import partial_attention
from braid.parallel.context.comm import RingP2P
from braid.parallel.context.fox import global_forget_cumsum


@dataclasses.dataclass(frozen=True)
class _Seg:
    """A run of tokens: attention position ``pos`` (meta at 0, text at M + global position), its index
    ``at`` in the tensor that holds it, ``length``; ``meta`` marks the sink segment."""

    pos: int
    at: int
    length: int
    meta: bool = False


def query_segments(cps) -> list[_Seg]:
    """The local rows: the meta segment (if any), then the text segments."""
    m = cps.meta
    segs = [_Seg(0, 0, m, True)] if m else []
    return segs + [_Seg(m + s.start, m + s.offset, s.length) for s in cps.layout.local]


def packet_segments(cps, rank: int) -> list[_Seg]:
    """The text segments of ``rank`` as they lie in its travelling packet (text tokens only)."""
    return [_Seg(cps.meta + s.start, s.offset, s.length) for s in cps.layout.segments_of(rank)]


class _Cfg:
    """Everything non-tensor of one call."""

    def __init__(self, cps, scale, window, s2, backend):
        self.cps, self.scale, self.window, self.s2, self.backend = cps, scale, window, s2, backend
        self.meta = cps.meta
        # S2 on the torch path: tiles aligned with the pattern's blocks, so skipped tiles are whole blocks.
        self.blocks = {} if s2 is None else {"block_q": max(16, s2.block), "block_k": max(16, s2.block)}
        self.ring = RingP2P(cps.group)
        self.grad_ring = RingP2P(cps.group)  # a second channel: gradients travel while K/V do
        if s2 is not None and (self.meta % s2.block or cps.layout.chunk % s2.block):
            raise ValueError(f"context parallelism with S2: the meta tokens ({self.meta}) and the per-rank chunk "
                             f"({cps.layout.chunk} tokens) must be multiples of model.s2.block = {s2.block}")

    def visible(self, qs: _Seg, ks: _Seg) -> bool:
        """False when no query of ``qs`` can see a key of ``ks`` (causal; window unless sinks)."""
        if ks.pos > qs.pos + qs.length - 1:
            return False
        if self.window is not None and not ks.meta and qs.pos - (ks.pos + ks.length - 1) >= self.window:
            return False
        return True

    def pair(self, qs: _Seg, ks: _Seg, q, c, doc, k, v, kc, kdoc):
        """``partial_attention`` of rows ``qs`` of (q, c, doc) against rows ``ks`` of (k, v, kc, kdoc)."""
        qsl, ksl = slice(qs.at, qs.at + qs.length), slice(ks.at, ks.at + ks.length)
        s2 = self.s2
        if s2 is not None and ks.pos:
            s2 = dataclasses.replace(s2, offset=s2.offset + ks.pos // s2.block)
        return partial_attention(
            q[:, qsl], k[:, ksl], v[:, ksl], q_offset=qs.pos - ks.pos, causal=True, scale=self.scale,
            window=self.window, sink=ks.length if ks.meta else 0,
            q_doc=None if doc is None else doc[:, qsl], k_doc=None if kdoc is None else kdoc[:, ksl],
            c_q=None if c is None else c[:, qsl], c_k=None if kc is None else kc[:, ksl], s2=s2,
            backend=self.backend, **self.blocks)


def _merge(o_acc, lse_acc, rows: slice, o_b, lse_b) -> None:
    """Fold a partial ``(o_b [B,t,H,Dv], lse_b [B,H,t])`` into the fp32 accumulators at ``rows``."""
    old = lse_acc[:, :, rows]
    new = torch.logaddexp(old, lse_b.to(old.dtype))
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w_old = torch.exp(old - safe).transpose(1, 2)[..., None]
    w_b = torch.exp(lse_b.to(old.dtype) - safe).transpose(1, 2)[..., None]
    o_acc[:, rows] = o_acc[:, rows] * w_old + o_b.to(o_acc.dtype) * w_b
    lse_acc[:, :, rows] = new


def _text(x: Optional[torch.Tensor], m: int) -> Optional[torch.Tensor]:
    return None if x is None else x[:, m:]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, doc, cfg: _Cfg):
        m, n, rank = cfg.meta, cfg.cps.size, cfg.cps.rank
        b, t, h, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        o_acc = torch.zeros(b, t, h, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((b, h, t), float("-inf"), dtype=acc, device=q.device)
        qsegs = query_segments(cfg.cps)
        packet = [x for x in (_text(k, m), _text(v, m), _text(c, m), _text(doc, m)) if x is not None]
        cur = packet
        with torch.no_grad():
            for step in range(n):
                src = (rank - step) % n
                if step < n - 1:
                    cfg.ring.start(cur, "ring.kv")
                if step == 0:  # local keys, meta included, read in place
                    ksegs = ([_Seg(0, 0, m, True)] if m else []) + \
                        [dataclasses.replace(s, at=s.at + m) for s in packet_segments(cfg.cps, rank)]
                    kt = (k, v, c, doc)
                else:
                    ksegs = packet_segments(cfg.cps, src)
                    kt = _unpack(held, c is not None, doc is not None)
                for qs in qsegs:
                    for ks in ksegs:
                        if cfg.visible(qs, ks):
                            o_b, lse_b = cfg.pair(qs, ks, q, c, doc, *kt)
                            _merge(o_acc, lse, slice(qs.at, qs.at + qs.length), o_b, lse_b)
                if step < n - 1:
                    held = cur = cfg.ring.wait()
        out = o_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, c, doc, out, lse)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, c, doc, out, lse = ctx.saved_tensors
        cfg = ctx.cfg
        m, n, rank = cfg.meta, cfg.cps.size, cfg.cps.rank
        acc = lse.dtype
        d_out = d_out.to(acc)
        out_f = out.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dc = None if c is None else torch.zeros(c.shape, dtype=acc, device=q.device)
        # Meta keys stay home: their gradients accumulate here.
        d_meta = [torch.zeros(x[:, :m].shape, dtype=acc, device=q.device) for x in (k, v)] + \
            ([torch.zeros(c[:, :m].shape, dtype=acc, device=q.device)] if c is not None else [])
        packet = [x for x in (_text(k, m), _text(v, m), _text(c, m), _text(doc, m)) if x is not None]
        grads = [torch.zeros(x.shape, dtype=acc, device=q.device) for x in packet[:3 if c is not None else 2]]
        qsegs = query_segments(cfg.cps)
        for step in range(n):
            src = (rank - step) % n
            kt = _unpack(packet, c is not None, doc is not None)
            if step < n - 1:  # K/V do not change in backward: send them on before computing
                cfg.ring.start(packet, "ring.kv")
            ksegs = packet_segments(cfg.cps, src)
            if step == 0 and m:
                meta = _Seg(0, 0, m, True)
                for qs in qsegs:
                    _pair_backward(cfg, qs, meta, q, c, doc, (k, v, c, doc), d_out, out_f, lse, dq, dc, d_meta)
            for qs in qsegs:
                for ks in ksegs:
                    if cfg.visible(qs, ks):
                        _pair_backward(cfg, qs, ks, q, c, doc, kt, d_out, out_f, lse, dq, dc, grads)
            # The fp32 accumulators follow their K/V; they make one hop more, which brings them home.
            cfg.grad_ring.start(grads, "ring.dkv")
            if step < n - 1:
                packet = cfg.ring.wait()
            grads = cfg.grad_ring.wait()
        dk = torch.cat([d_meta[0], grads[0]], 1).to(k.dtype)
        dv = torch.cat([d_meta[1], grads[1]], 1).to(v.dtype)
        if c is not None:
            dc = (dc + torch.cat([d_meta[2], grads[2]], 1)).to(c.dtype)
        return dq.to(q.dtype), dk, dv, dc, None, None


def _unpack(packet, has_c: bool, has_doc: bool):
    k, v = packet[0], packet[1]
    c = packet[2] if has_c else None
    doc = packet[2 + has_c] if has_doc else None
    return k, v, c, doc


def _pair_backward(cfg: _Cfg, qs: _Seg, ks: _Seg, q, c, doc, kt, d_out, out, lse, dq, dc, dkv) -> None:
    """Add one pair's gradient to dq/dc (rows ``qs``) and to the key accumulators ``dkv`` (rows ``ks``)."""
    k, v, kc, kdoc = kt
    rows = slice(qs.at, qs.at + qs.length)
    cols = slice(ks.at, ks.at + ks.length)
    with torch.enable_grad():
        qb = q[:, rows].detach().requires_grad_()
        kb, vb = k[:, cols].detach().requires_grad_(), v[:, cols].detach().requires_grad_()
        cqb = None if c is None else c[:, rows].detach().requires_grad_()
        ckb = None if kc is None else kc[:, cols].detach().requires_grad_()
        sub = _Seg(qs.pos, 0, qs.length, qs.meta), _Seg(ks.pos, 0, ks.length, ks.meta)
        o_b, lse_b = cfg.pair(*sub, qb, cqb, None if doc is None else doc[:, rows], kb, vb, ckb,
                              None if kdoc is None else kdoc[:, cols])
        l_all = lse[:, :, rows]
        safe = torch.where(torch.isinf(l_all), torch.zeros_like(l_all), l_all)
        w = torch.where(torch.isinf(lse_b), torch.zeros_like(l_all), torch.exp(lse_b.to(l_all.dtype) - safe))
        wt = w.transpose(1, 2)[..., None]
        g_o = wt * d_out[:, rows]
        g_lse = w * ((d_out[:, rows] * (o_b.detach().to(out.dtype) - out[:, rows])).sum(-1)).transpose(1, 2)
        inputs = [qb, kb, vb] + ([cqb, ckb] if cqb is not None else [])
        gs = torch.autograd.grad((o_b, lse_b), inputs, (g_o.to(o_b.dtype), g_lse.to(lse_b.dtype)),
                                 allow_unused=True)
    dq[:, rows] += _z(gs[0], qb)
    dkv[0][:, cols] += _z(gs[1], kb)
    dkv[1][:, cols] += _z(gs[2], vb)
    if cqb is not None:
        dc[:, rows] += _z(gs[3], cqb)
        dkv[2][:, cols] += _z(gs[4], ckb)


def _z(g, like):
    return torch.zeros_like(like) if g is None else g


def ring_attention(cps, q, k, v, *, scale=None, window=None, doc_ids=None, log_forget=None, s2=None,
                   backend: str = "auto") -> torch.Tensor:
    """Causal attention of the local queries over the global sequence (see ``CPSeq.attention``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cfg = _Cfg(cps, scale, window, s2, resolve_backend(backend, q))
    c = None if log_forget is None else global_forget_cumsum(cps, log_forget)
    return _RingAttention.apply(q, k, v, c, doc_ids, cfg)


def ring_comm_bytes(cps_size: int, batch: int, local_len: int, n_kv_heads: int, head_dim: int, v_dim: int,
                    n_heads: int, dtype_bytes: int, fox: bool = False, docs: bool = False,
                    n_segments: int = 2) -> dict[str, int]:
    """Bytes one rank sends for one ring attention layer (forward + backward), by COUNTER label.

    ``local_len``: text tokens per rank (meta tokens never travel). Forward: ``cp−1`` hops of the
    packet (K, V, fp32 FoX cumsums, int64 doc ids). Backward: the same ``cp−1`` K/V hops, plus ``cp``
    hops of the fp32 gradient accumulators (dK, dV, dc). FoX adds the all-gather of per-segment
    gate sums (fp32) and its backward all-reduce.
    """
    n = cps_size
    kv = batch * local_len * n_kv_heads * (head_dim + v_dim) * dtype_bytes
    c = batch * local_len * n_heads * 4 if fox else 0
    doc = batch * local_len * 8 if docs else 0
    grads = batch * local_len * n_kv_heads * (head_dim + v_dim) * 4 + c
    out = {"ring.kv": 2 * (n - 1) * (kv + c + doc), "ring.dkv": n * grads}
    if fox:
        sums = batch * n_segments * n_heads * 4
        out["fox.sums"] = (n - 1) * sums
        out["fox.sums.grad"] = round(2 * (n - 1) / n * n * sums)
    return out
