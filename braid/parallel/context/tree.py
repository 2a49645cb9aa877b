"""Tree attention (Shyam et al., "Tree Attention: Topology-aware Decoding for Long-Context Attention on
GPU clusters"): attention over a sequence-sharded K/V is a reduction over the ranks.

Every rank computes the partial ``(o_p, lse_p)`` of the queries against the keys it holds; then
``m = max_p lse_p``, ``den = Σ_p exp(lse_p − m)``, ``num = Σ_p o_p·exp(lse_p − m)`` and ``o = num/den``
are all-reductions, which the collective library runs as a tree. Topology-aware: with
``cps.cp.node_size`` ranks per node (< cp), each reduction runs within the node first (fast links),
then across nodes among the ranks with the same index in their node: the node sums are identical
on every rank of a node, so the second step completes the group's sum.

Training (``tree_attention``): the text queries (with their FoX cumulative gates and document ids) are
all-gathered; each rank attends all of them to its local key segments, one ``partial_attention`` per
(query segment, key segment) pair at relative positions as in ``ring.py``. The meta keys live on
every rank, so only rank 0 counts them. The partials are reduced so that each rank keeps its own
queries' rows (an all-reduce; gloo has no reduce-scatter); the backward all-gathers the output
gradients and reduce-scatters (as an all-to-all) the query gradients. Composed of differentiable ops,
so autograd gives the backward, and ``m`` needs none: ``o`` does not depend on it.
Meta queries see only meta keys (causal, all sinks), so their rows are computed locally.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from braid.kernels.attention import attention, resolve_backend
from braid.kernels.self_check import cp_attention_signature
from braid.parallel.collectives import all_gather, all_gather_raw, all_reduce_, all_reduce_max_, reduce_to_owner
from braid.parallel.context.fox import global_forget_cumsum
from braid.parallel.context.pairs import PairAttention, Seg


def reduction_levels(group, node_size: Optional[int], cache: Optional[dict] = None) -> list:
    """The process groups of a topology-aware all-reduce over ``group``: ``[group]``, or with
    ``node_size`` ranks per node (< group size) ``[node group, cross-node group]`` of this rank; a node
    is ``node_size`` consecutive ranks of ``group``.

    The subgroups are made once per (group, node_size) and kept in ``cache`` (the caller's, e.g. the
    ``ContextParallel``): creating a group is collective. Every rank creates its node group, then its
    cross group, with only the members synchronising, so all ranks agree on the order.
    """
    n = dist.get_world_size(group)
    if node_size is None or node_size >= n:
        return [group]
    if node_size < 1 or n % node_size:
        raise ValueError(f"tree attention: the cp ranks per node ({node_size}: LOCAL_WORLD_SIZE / parallel.tp) "
                         f"must divide parallel.cp ({n})")
    key = (id(group), node_size)
    if cache is not None and key in cache:
        return cache[key]
    ranks = dist.get_process_group_ranks(group)
    me = dist.get_rank(group)
    node, local = divmod(me, node_size)
    node_ranks = ranks[node * node_size:(node + 1) * node_size]
    cross_ranks = ranks[local::node_size]
    levels = [dist.new_group(node_ranks, use_local_synchronization=True),
              dist.new_group(cross_ranks, use_local_synchronization=True)]
    if cache is not None:
        cache[key] = levels
    return levels


def _group_cache(cp) -> dict:
    """The subgroups made for a ``ContextParallel``, kept on it: group creation is collective, once per model."""
    if not hasattr(cp, "tree_groups"):
        cp.tree_groups = {}
    return cp.tree_groups


def tree_weights(lse: torch.Tensor, levels, label: str) -> torch.Tensor:
    """``exp(lse − m)`` with ``m`` the all-reduced maximum of ``lse`` (a constant for autograd: the
    combined output does not depend on it); 0 where lse = −∞ (no visible key here)."""
    m = lse.detach().clone()
    for g in levels:
        all_reduce_max_(m, g, label + ".max")
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return torch.exp(lse - m)


def pack_partial(o: torch.Tensor, lse: torch.Tensor, levels, label: str) -> torch.Tensor:
    """o ``[..., T, H, Dv]``, lse ``[..., H, T]`` → ``[..., T, H, Dv + 1]``: numerator and denominator
    terms of this rank, ready to be summed over the ranks."""
    w = tree_weights(lse, levels, label).transpose(-1, -2)[..., None]  # [..., T, H, 1]
    return torch.cat([o.to(w.dtype) * w, w], -1)


def unpack_sum(total: torch.Tensor) -> torch.Tensor:
    """The summed ``[..., Dv + 1]`` → ``num / den`` (0 for rows no rank could see)."""
    num, den = total[..., :-1], total[..., -1:]
    seen = den > 0
    return torch.where(seen, num / torch.where(seen, den, torch.ones_like(den)), torch.zeros_like(num))


def tree_reduce(o: torch.Tensor, lse: torch.Tensor, levels, label: str = "tree") -> torch.Tensor:
    """Combine every rank's partial ``(o [..., T, H, Dv], lse [..., H, T])`` into the full attention output,
    on every rank (fp32, fp64 stays; not differentiable: for decoding)."""
    total = pack_partial(o, lse, levels, label)
    for g in levels:
        all_reduce_(total, g, label + ".sum")
    return unpack_sum(total)


def _merge_local(parts: list, rows: int, like: torch.Tensor, dv: int, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial ``(o_b [B,t,H,Dv], lse_b [B,H,t])`` of the same rows (differentiably) → o, lse."""
    b, h = like.shape[0], like.shape[2]
    if not parts:
        return (torch.zeros(b, rows, h, dv, dtype=acc, device=like.device),
                torch.full((b, h, rows), float("-inf"), dtype=acc, device=like.device))
    lses = torch.stack([p[1].to(acc) for p in parts])
    # logsumexp by hand: torch's has a NaN gradient where every part is −∞ (rows no local key sees).
    top = lses.detach().amax(0)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    total = torch.exp(lses - top).sum(0)
    seen = total > 0
    lse = torch.where(seen, top + torch.log(torch.where(seen, total, torch.ones_like(total))), float("-inf"))
    safe = torch.where(seen, lse, torch.zeros_like(lse))
    o = sum(p[0].to(acc) * torch.exp(lb - safe).transpose(1, 2)[..., None] for p, lb in zip(parts, lses))
    return o, lse


def tree_attention(cps, q, k, v, *, scale=None, window=None, doc_ids=None, log_forget=None, s2=None,
                   backend: str = "auto") -> torch.Tensor:
    """Causal attention of the local queries over the global sequence (see ``CPSeq.attention``).

    q ``[B, M+T_loc, Hq, D]``, k/v ``[B, M+T_loc, Hkv, D/Dv]``, doc_ids ``[B, M+T_loc]`` (meta −1),
    log_forget ``[B, M+T_loc, Hq]`` → ``[B, M+T_loc, Hq, Dv]`` in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cfg = PairAttention(cps, scale, window, s2, resolve_backend(backend, q, "attention", cp_attention_signature(
        q, k, v, window, doc_ids, log_forget, s2)))
    n, m, group = cps.size, cps.meta, cps.group
    levels = reduction_levels(group, cps.cp.node_size, _group_cache(cps.cp))
    c = None if log_forget is None else global_forget_cumsum(cps, log_forget)
    acc = torch.promote_types(q.dtype, torch.float32)

    # Every rank's text queries (and what their rows need) here: [cp, B, T_loc, ...].
    q_all = all_gather(q[:, m:], group, "tree.q")
    c_all = None if c is None else all_gather(c[:, m:], group, "tree.c")
    doc_all = None if doc_ids is None else all_gather_raw(doc_ids[:, m:], group, "tree.doc")
    ksegs = [Seg(m + s.start, m + s.offset, s.length) for s in cps.layout.local]
    if m and cps.rank == 0:  # every rank holds the meta keys; one counts them
        ksegs = [Seg(0, 0, m, True)] + ksegs
    outs, lses = [], []
    for r in range(n):
        qc, qdoc = None if c_all is None else c_all[r], None if doc_all is None else doc_all[r]
        o_r, lse_r = [], []
        for s in cps.layout.segments_of(r):
            qs = Seg(m + s.start, s.offset, s.length)
            parts = [cfg.pair(qs, ks, q_all[r], qc, qdoc, k, v, c, doc_ids) for ks in ksegs if cfg.visible(qs, ks)]
            o_s, lse_s = _merge_local(parts, s.length, q, v.shape[-1], acc)
            o_r.append(o_s)
            lse_r.append(lse_s)
        outs.append(torch.cat(o_r, 1))
        lses.append(torch.cat(lse_r, 2))
    partial = pack_partial(torch.stack(outs), torch.stack(lses), levels, "tree")  # [cp, B, T_loc, H, Dv+1]
    out = unpack_sum(reduce_to_owner(partial, group, levels, "tree.sum")).to(q.dtype)
    if m:
        out = torch.cat([attention(q[:, :m], k[:, :m], v[:, :m], causal=True, scale=scale, backend=backend), out], 1)
    return out


def tree_comm_bytes(cps_size: int, batch: int, local_len: int, head_dim: int, v_dim: int, n_heads: int,
                    dtype_bytes: int, fox: bool = False, docs: bool = False, node_size: Optional[int] = None,
                    n_segments: int = 2) -> dict[str, int]:
    """Bytes one rank sends for one training tree-attention layer (forward + backward), by COUNTER label.

    Forward: the text queries all-gathered (with fp32 FoX cumsums and int64 doc ids), the fp32 max of
    the lse partials of all ``cp·local_len`` queries and the sum of their ``Dv + 1`` numerator and
    denominator terms, each as all-reduces over the levels (node, then cross-node). Backward: the
    sums' gradient all-gathered, and the query (and cumsum, and FoX per-segment sum) gradients
    reduce-scattered as all-to-alls.
    """
    n = cps_size
    sizes = [n] if node_size is None or node_size >= n else [node_size, n // node_size]

    def all_reduce(nbytes: int) -> int:
        return sum(round(2 * (g - 1) / g * nbytes) for g in sizes)

    rows = batch * local_len * n_heads
    q = rows * head_dim * dtype_bytes
    sent = {"tree.q": (n - 1) * q, "tree.q.grad": round((n - 1) / n * n * q),
            "tree.max": all_reduce(n * rows * 4), "tree.sum": all_reduce(n * rows * (v_dim + 1) * 4),
            "tree.sum.grad": (n - 1) * rows * (v_dim + 1) * 4}
    if fox:
        sums = batch * n_segments * n_heads * 4
        sent.update({"tree.c": (n - 1) * rows * 4, "tree.c.grad": round((n - 1) / n * n * rows * 4),
                     "fox.sums": (n - 1) * sums, "fox.sums.grad": (n - 1) * sums})
    if docs:
        sent["tree.doc"] = (n - 1) * batch * local_len * 8
    return sent
