"""Attention between segments of a context-parallel layout: the building block of ring, S2 and tree.

A pair is (query segment, key segment) at attention positions (meta tokens at 0..M−1, text at
M + global position). ``PairAttention.pair`` runs ``partial_attention`` at relative positions
(``q_offset`` = query start − key start), so kernels need no notion of CP: sinks exist only in the
meta segment and the S2 residues shift by the key segment's block index. Partials merge by their fp32
log-sum-exp (``merge_partial``); ``pair_backward`` recomputes a pair and back-propagates
``(w·dO, w·(dO·(o_b − o)))`` with ``w = exp(lse_b − lse)``: exactly the pair's share of the gradient
of the merged output, for either kernel backend.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from braid.kernels.attention_blocked import partial_attention


@dataclasses.dataclass(frozen=True)
class Seg:
    """A run of tokens: attention position ``pos`` (meta at 0, text at M + global position), its index
    ``at`` in the tensor that holds it, ``length``; ``meta`` marks the sink segment."""

    pos: int
    at: int
    length: int
    meta: bool = False


def query_segments(cps) -> list[Seg]:
    """The local rows: the meta segment (if any), then the text segments."""
    m = cps.meta
    segs = [Seg(0, 0, m, True)] if m else []
    return segs + [Seg(m + s.start, m + s.offset, s.length) for s in cps.layout.local]


def packet_segments(cps, rank: int) -> list[Seg]:
    """The text segments of ``rank`` as they lie in its travelling packet (text tokens only)."""
    return [Seg(cps.meta + s.start, s.offset, s.length) for s in cps.layout.segments_of(rank)]


class PairAttention:
    """Everything non-tensor of one call."""

    def __init__(self, cps, scale, window, s2, backend):
        self.cps, self.scale, self.window, self.s2, self.backend = cps, scale, window, s2, backend
        self.meta = cps.meta
        # S2 on the torch path: tiles aligned with the pattern's blocks, so skipped tiles are whole blocks.
        self.blocks = {} if s2 is None else {"block_q": max(16, s2.block), "block_k": max(16, s2.block)}
        if s2 is not None and (self.meta % s2.block or cps.layout.chunk % s2.block):
            raise ValueError(f"context parallelism with S2: the meta tokens ({self.meta}) and the per-rank chunk "
                             f"({cps.layout.chunk} tokens) must be multiples of model.s2.block = {s2.block}")

    def visible(self, qs: Seg, ks: Seg) -> bool:
        """False when no query of ``qs`` can see a key of ``ks`` (causal; window unless sinks)."""
        if ks.pos > qs.pos + qs.length - 1:
            return False
        if self.window is not None and not ks.meta and qs.pos - (ks.pos + ks.length - 1) >= self.window:
            return False
        return True

    def pair(self, qs: Seg, ks: Seg, q, c, doc, k, v, kc, kdoc):
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


def merge_partial(o_acc, lse_acc, rows: slice, o_b, lse_b) -> None:
    """Fold a partial ``(o_b [B,t,H,Dv], lse_b [B,H,t])`` into the fp32 accumulators at ``rows``."""
    old = lse_acc[:, :, rows]
    new = torch.logaddexp(old, lse_b.to(old.dtype))
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w_old = torch.exp(old - safe).transpose(1, 2)[..., None]
    w_b = torch.exp(lse_b.to(old.dtype) - safe).transpose(1, 2)[..., None]
    o_acc[:, rows] = o_acc[:, rows] * w_old + o_b.to(o_acc.dtype) * w_b
    lse_acc[:, :, rows] = new


def text_rows(x: Optional[torch.Tensor], m: int) -> Optional[torch.Tensor]:
    return None if x is None else x[:, m:]


def pair_backward(cfg: PairAttention, qs: Seg, ks: Seg, q, c, doc, kt, d_out, out, lse, dq, dc, dkv) -> None:
    """Add one pair's gradient to dq/dc (rows ``qs``) and to the key accumulators ``dkv`` (rows ``ks``)."""
    k, v, kc, kdoc = kt
    rows = slice(qs.at, qs.at + qs.length)
    cols = slice(ks.at, ks.at + ks.length)
    with torch.enable_grad():
        qb = q[:, rows].detach().requires_grad_()
        kb, vb = k[:, cols].detach().requires_grad_(), v[:, cols].detach().requires_grad_()
        cqb = None if c is None else c[:, rows].detach().requires_grad_()
        ckb = None if kc is None else kc[:, cols].detach().requires_grad_()
        sub = Seg(qs.pos, 0, qs.length, qs.meta), Seg(ks.pos, 0, ks.length, ks.meta)
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
