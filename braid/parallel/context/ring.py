"""Ring attention: K/V blocks travel around the context-parallel ring while each rank attends its
local queries to the block it holds; partial results are merged by their fp32 log-sum-exp.

Forward: step 0 attends to the local keys (meta tokens included: they never travel, every rank has
them), then ``cp − 1`` steps each send the current text K/V packet to the next rank (asynchronously,
overlapped with the computation on it) and attend to the packet received from the previous one.
Backward re-circulates K/V the same way with fp32 dK/dV accumulators travelling alongside; after
``cp`` hops the accumulators are home. Memory stays O(local sequence) on every rank.

Each (query segment, key segment) pair is one ``pairs.PairAttention.pair`` call; pairs that no
query can see (causal, window) are skipped, which is what the zigzag layout balances.
"""

from __future__ import annotations

import dataclasses

import torch

from braid.kernels.attention import resolve_backend
from braid.kernels.self_check import cp_attention_signature
from braid.parallel.context.comm import RingP2P
from braid.parallel.context.fox import global_forget_cumsum
from braid.parallel.context.pairs import (
    PairAttention,
    Seg,
    merge_partial,
    packet_segments,
    pair_backward,
    query_segments,
    text_rows,
)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, doc, cfg: PairAttention):
        m, n, rank = cfg.meta, cfg.cps.size, cfg.cps.rank
        b, t, h, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        o_acc = torch.zeros(b, t, h, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((b, h, t), float("-inf"), dtype=acc, device=q.device)
        qsegs = query_segments(cfg.cps)
        packet = [x for x in (text_rows(k, m), text_rows(v, m), text_rows(c, m), text_rows(doc, m)) if x is not None]
        cur = packet
        with torch.no_grad():
            for step in range(n):
                src = (rank - step) % n
                if step < n - 1:
                    cfg.ring.start(cur, "ring.kv")
                if step == 0:  # local keys, meta included, read in place
                    ksegs = ([Seg(0, 0, m, True)] if m else []) + \
                        [dataclasses.replace(s, at=s.at + m) for s in packet_segments(cfg.cps, rank)]
                    kt = (k, v, c, doc)
                else:
                    ksegs = packet_segments(cfg.cps, src)
                    kt = _unpack(cur, c is not None, doc is not None)
                for qs in qsegs:
                    for ks in ksegs:
                        if cfg.visible(qs, ks):
                            o_b, lse_b = cfg.pair(qs, ks, q, c, doc, *kt)
                            merge_partial(o_acc, lse, slice(qs.at, qs.at + qs.length), o_b, lse_b)
                if step < n - 1:
                    cur = cfg.ring.wait()
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
        packet = [x for x in (text_rows(k, m), text_rows(v, m), text_rows(c, m), text_rows(doc, m)) if x is not None]
        grads = [torch.zeros(x.shape, dtype=acc, device=q.device) for x in packet[:3 if c is not None else 2]]
        qsegs = query_segments(cfg.cps)
        for step in range(n):
            src = (rank - step) % n
            kt = _unpack(packet, c is not None, doc is not None)
            if step < n - 1:  # K/V do not change in backward: send them on before computing
                cfg.ring.start(packet, "ring.kv")
            ksegs = packet_segments(cfg.cps, src)
            if step == 0 and m:
                meta = Seg(0, 0, m, True)
                for qs in qsegs:
                    pair_backward(cfg, qs, meta, q, c, doc, (k, v, c, doc), d_out, out_f, lse, dq, dc, d_meta)
            for qs in qsegs:
                for ks in ksegs:
                    if cfg.visible(qs, ks):
                        pair_backward(cfg, qs, ks, q, c, doc, kt, d_out, out_f, lse, dq, dc, grads)
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


def ring_attention(cps, q, k, v, *, scale=None, window=None, doc_ids=None, log_forget=None, s2=None,
                   backend: str = "auto") -> torch.Tensor:
    """Causal attention of the local queries over the global sequence (see ``CPSeq.attention``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cfg = PairAttention(cps, scale, window, s2, resolve_backend(backend, q, "attention", cp_attention_signature(
        q, k, v, window, doc_ids, log_forget, s2)))
    cfg.ring = RingP2P(cps.group)
    cfg.grad_ring = RingP2P(cps.group)  # a second channel: gradients travel while K/V do
    c = None if log_forget is None else global_forget_cumsum(cps, log_forget)
    return _RingAttention.apply(q, k, v, c, doc_ids, cfg)


def ring_comm_bytes(cps_size: int, batch: int, local_len: int, n_kv_heads: int, head_dim: int, v_dim: int,
                    n_heads: int, dtype_bytes: int, fox: bool = False, docs: bool = False,
                    n_segments: int = 2) -> dict[str, int]:
    """Bytes one rank sends for one ring attention layer (forward + backward), by COUNTER label.

    ``local_len``: text tokens per rank (meta tokens never travel). Forward: ``cp−1`` hops of the
    packet (K, V, fp32 FoX cumsums, int64 doc ids). Backward: the same ``cp−1`` K/V hops, plus ``cp``
    hops of the fp32 gradient accumulators (dK, dV, dc). FoX adds the all-gather of per-segment
    gate sums (fp32) and its backward reduce-scatter, ``cp−1`` times one rank's sums each way.
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
        out["fox.sums.grad"] = (n - 1) * sums
    return out
