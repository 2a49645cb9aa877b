"""Ulysses (DeepSpeed-Ulysses) context-parallel attention: trade the sequence sharding for a head sharding.

An all-to-all turns every rank's ``[B, T_loc, H, D]`` text rows into ``[B, T, H/cp, D]``: all
positions, ``H/cp`` heads. The segments arriving from the ranks are put back in global order (the
layout's ``global_order``), so ``braid.kernels.attention`` runs unchanged on the whole sequence with
the meta tokens as its prefix (``sink=M``); the inverse all-to-all returns each rank its own rows for
all heads. Traffic per rank ≈ 4·(T/cp)·H·D·(cp−1)/cp per layer, independent of the attention
pattern; it needs the query heads divisible by cp.

GQA: rank r gets query heads ``r·Hq/cp ..`` and must get every kv head they read. When ``Hkv`` is not
a multiple of cp, each kv head is first replicated ``rep = cp / gcd(Hkv, cp)`` times (query head h →
replica ``h // (Hq / (Hkv·rep))``, still kv head ``h // (Hq/Hkv)``); ``Hkv·rep = lcm(Hkv, cp)``
divides Hq, so every rank gets ``Hkv·rep/cp`` whole replicas. With ``Hkv < cp`` several ranks thus
receive the same kv head (unavoidable: each needs it at every position); autograd sums the replicas'
gradients back into the one local kv head.

FoX: the log forget gates are per head, so they travel with their heads and the attention op takes
the cumulative sum over the reassembled sequence itself: no cross-rank scan is needed.

Meta tokens: every rank holds them, and a meta query sees only meta keys (causal, all sinks, which
ignore windows, documents, forget gates and S2), so meta rows are computed locally for all heads with
no communication; the head-sharded call takes only the text queries (the last T of M + T keys).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from braid.kernels.attention import attention
from braid.parallel.collectives import all_gather_raw, all_to_all


def _check_heads(hq: int, cp: int) -> None:
    if hq % cp:
        raise ValueError(f"ulysses context parallelism needs model.n_heads ({hq}) divisible by parallel.cp ({cp})")


def _repeat_kv(x: torch.Tensor, cp: int) -> torch.Tensor:
    """``[B, S, Hkv, D]`` → ``[B, S, lcm(Hkv, cp), D]``: each kv head repeated ``cp / gcd(Hkv, cp)`` times."""
    rep = cp // math.gcd(x.shape[2], cp)
    return x if rep == 1 else x.repeat_interleave(rep, dim=2)


def _to_heads(cps, x: torch.Tensor, label: str) -> torch.Tensor:
    """Local text rows ``[B, T_loc, H, ...]`` → ``[B, T, H/cp, ...]`` (this rank's heads, global order)."""
    per = x.shape[2] // cps.size
    got = all_to_all([x[:, :, r * per:(r + 1) * per] for r in range(cps.size)], cps.group, label)
    segs = {(r, i): s for r in range(cps.size) for i, s in enumerate(cps.layout.segments_of(r))}
    return torch.cat([got[r].narrow(1, segs[(r, i)].offset, segs[(r, i)].length)
                      for r, i in cps.layout.global_order()], 1)


def _to_sequence(cps, x: torch.Tensor, label: str) -> torch.Tensor:
    """``[B, T, H/cp, ...]`` in global order → this rank's rows ``[B, T_loc, H, ...]`` (all heads)."""
    lay = cps.layout
    parts = [torch.cat([x.narrow(1, s.start, s.length) for s in lay.segments_of(r)], 1) for r in range(cps.size)]
    got = all_to_all(parts, cps.group, label)
    return torch.cat(got, 2)  # rank r sent its heads r·H/cp ..: concatenated in rank order


def ulysses_attention(cps, q, k, v, *, scale=None, window=None, doc_ids=None, log_forget=None, s2=None,
                      backend: str = "auto") -> torch.Tensor:
    """Causal attention of the local queries over the global sequence (see ``CPSeq.attention``).

    q ``[B, M+T_loc, Hq, D]``, k/v ``[B, M+T_loc, Hkv, D/Dv]``, doc_ids ``[B, M+T_loc]`` int (meta −1),
    log_forget ``[B, M+T_loc, Hq]`` (local gates, any float dtype) → ``[B, M+T_loc, Hq, Dv]`` in q's dtype.
    """
    n, m = cps.size, cps.meta
    hq = q.shape[2]
    _check_heads(hq, n)
    per = hq // n
    heads = slice(cps.rank * per, (cps.rank + 1) * per)
    k_rep, v_rep = _repeat_kv(k, n), _repeat_kv(v, n)
    per_kv = k_rep.shape[2] // n
    kv_heads = slice(cps.rank * per_kv, (cps.rank + 1) * per_kv)

    # q, k and v move in one all-to-all (same dtype): flatten the head dims and split them after.
    d, dv = q.shape[-1], v.shape[-1]
    text = torch.cat([q[:, m:].unflatten(2, (n, per)).flatten(3), k_rep[:, m:].unflatten(2, (n, per_kv)).flatten(3),
                      v_rep[:, m:].unflatten(2, (n, per_kv)).flatten(3)], -1)  # [B, T_loc, cp, per·D + ...]
    full = _to_heads(cps, text, "ulysses.qkv")[:, :, 0]  # [B, T, packed]
    qg, kg, vg = full.split([per * d, per_kv * d, per_kv * dv], -1)
    qg = qg.unflatten(-1, (per, d))
    kg = torch.cat([k_rep[:, :m, kv_heads], kg.unflatten(-1, (per_kv, d))], 1)
    vg = torch.cat([v_rep[:, :m, kv_heads], vg.unflatten(-1, (per_kv, dv))], 1)
    lf = None
    if log_forget is not None:
        lf = torch.cat([log_forget[:, :m, heads], _to_heads(cps, log_forget[:, m:], "ulysses.forget")], 1)
    doc = None
    if doc_ids is not None:
        every = all_gather_raw(doc_ids[:, m:], cps.group, "ulysses.doc")
        doc = torch.cat([doc_ids[:, :m], cps.layout.unshard(list(every), 1)], 1)
    if s2 is not None:  # this rank's heads are global heads rank·per ..
        s2 = dataclasses.replace(s2, head_start=s2.head_start + cps.rank * per, n_heads=s2.n_heads or hq)
    o = attention(qg, kg, vg, causal=True, scale=scale, log_forget=lf, window=window, sink=m, doc_ids=doc,
                  s2=s2, backend=backend)  # [B, T, per, Dv]: text queries only
    out = _to_sequence(cps, o, "ulysses.out")
    if m:
        o_meta = attention(q[:, :m], k[:, :m], v[:, :m], causal=True, scale=scale, backend=backend)
        out = torch.cat([o_meta, out], 1)
    return out


def ulysses_comm_bytes(cps_size: int, batch: int, local_len: int, n_kv_heads: int, head_dim: int, v_dim: int,
                       n_heads: int, dtype_bytes: int, fox: bool = False, docs: bool = False,
                       forget_bytes: int = 4) -> dict[str, int]:
    """Bytes one rank sends for one Ulysses attention layer (forward + backward), by COUNTER label.

    ``local_len``: text tokens per rank (meta tokens never travel). Forward: the q/k/v all-to-all (kv
    heads replicated to ``lcm(Hkv, cp)``), the output all-to-all back, FoX gates (``forget_bytes`` each)
    in their own all-to-all, int64 doc ids all-gathered; the backward sends every all-to-all again.
    """
    n = cps_size
    kv_heads = math.lcm(n_kv_heads, n)
    a2a = (n - 1) / n
    qkv = batch * local_len * (n_heads * head_dim + kv_heads * (head_dim + v_dim)) * dtype_bytes
    out = batch * local_len * n_heads * v_dim * dtype_bytes
    sent = {"ulysses.qkv": round(a2a * qkv), "ulysses.qkv.grad": round(a2a * qkv),
            "ulysses.out": round(a2a * out), "ulysses.out.grad": round(a2a * out)}
    if fox:
        lf = batch * local_len * n_heads * forget_bytes
        sent.update({"ulysses.forget": round(a2a * lf), "ulysses.forget.grad": round(a2a * lf)})
    if docs:
        sent["ulysses.doc"] = (n - 1) * batch * local_len * 8
    return sent
