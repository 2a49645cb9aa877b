"""Decoding with the KV cache sharded over ranks by sequence, combined by tree attention.

Every rank runs the whole model on the same new tokens (weights replicated), so every rank has the new
queries, keys, values and forget gates; each keeps only the keys of the positions it owns. Attention is
then each rank's partial ``(o, lse)`` over its shard, combined by :func:`braid.parallel.context.tree.tree_reduce`
(a max and a sum all-reduce, within nodes then across): per step and layer O(B·t·H·Dv) bytes, whatever
the context length, while each rank stores about 1/cp of the cache.

Ownership: meta tokens (the sinks, positions ``< sink``) on rank 0; text position ``p`` on rank
``((p − sink) // block) % cp`` (round-robin blocks, so the shards stay balanced as generation goes on).
A shard's keys need not be contiguous: each carries its stream position, and the mask is built from
the positions (``braid.kernels.attention_blocked.visibility``, the op's own definition).

FoX: the cache keeps the global cumulative sum ``c`` of every stored key (fp32) and every rank keeps the
running total (the gates of all new tokens are known everywhere), so no scan crosses ranks.

Use: ``cache = sharded_decode_cache(group)`` then ``braid.models.decoding.decode_step(model, ids, cache)``
as with an ordinary cache (see also :func:`greedy_generate`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from braid.kernels.attention_blocked import visibility
from braid.models.decoding import DecodeCache, decode_step
from braid.parallel.context.tree import reduction_levels, tree_reduce


def tree_decode_attention(q: torch.Tensor, k_cache_shard: torch.Tensor, v_cache_shard: torch.Tensor, group, *,
                          q_pos: torch.Tensor, k_pos: torch.Tensor, scale: Optional[float] = None,
                          window: Optional[int] = None, sink: int = 0, c_q: Optional[torch.Tensor] = None,
                          c_k: Optional[torch.Tensor] = None, levels=None) -> torch.Tensor:
    """Causal attention of a few new queries to a KV cache sharded over ``group`` by sequence.

    Args:
        q: ``[B, t, Hq, D]`` the new queries (the same on every rank) at stream positions ``q_pos [t]``.
        k_cache_shard / v_cache_shard: ``[B, S_loc, Hkv, D/Dv]`` this rank's keys, at ``k_pos [S_loc]``
            (any order, any subset; ``S_loc`` may be 0).
        window, sink: as ``braid.kernels.attention`` (sinks: positions ``< sink``).
        c_q ``[B, t, Hq]`` / c_k ``[B, S_loc, Hq]``: FoX global cumulative log forget gates (or None).
        levels: reduction groups (``tree.reduction_levels``); default ``[group]``.
    Returns:
        ``[B, t, Hq, Dv]`` in q's dtype, identical on every rank. Sends O(B·t·Hq·Dv), independent of S.
    """
    b, t, hq, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = d ** -0.5 if scale is None else scale
    g = hq // k_cache_shard.shape[2]
    k = k_cache_shard.to(acc).repeat_interleave(g, dim=2)  # decode: t is small, the repeat is cheap
    v = v_cache_shard.to(acc).repeat_interleave(g, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.to(acc), k) * scale
    if c_q is not None:  # + c_i − c_j, except on sink keys, which never fade
        bias = c_q.to(acc).transpose(1, 2)[..., None] - c_k.to(acc).permute(0, 2, 1)[:, :, None, :]
        s = s + bias.masked_fill((k_pos < sink)[None, None, None], 0.0)
    vis = visibility(q_pos, k_pos, causal=True, window=window, sink=sink)  # [1, t, S_loc]
    s = s.masked_fill(~vis[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1) if s.shape[-1] else torch.full((b, hq, t), float("-inf"), dtype=acc,
                                                                  device=q.device)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    o = torch.einsum("bhts,bshd->bthd", torch.exp(s - safe[..., None]), v)
    return tree_reduce(o, lse, levels or [group], "tree_decode").to(q.dtype)


class ShardedKV:
    """The ``DecodeCache.attend`` hook of a cache sharded over ``group`` (see the module docstring):
    called as ``(stream, st, q, k, v, log_forget, ...)`` in place of ``braid.models.caches.KVCache.attend``.

    Entries of the layer's ``st`` (its ``KVCache``, a dict): ``k``, ``v`` ``[B, S_loc, Hkv, D]``, ``pos`` ``[S_loc]``
    int64, with forget gates ``c`` ``[B, S_loc, Hq]`` fp32 and ``c_total`` ``[B, Hq]`` (the running
    sum, on every rank)."""

    def __init__(self, group, block: int = 64, node_size: Optional[int] = None):
        if block < 1:
            raise ValueError(f"sharded decoding: block must be ≥ 1 tokens, got {block}")
        self.group, self.block = group, block
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.levels = reduction_levels(group, node_size, {})

    def owner(self, pos: torch.Tensor, sink: int) -> torch.Tensor:
        """Rank holding each stream position ``pos [n]``: sinks on rank 0, text in round-robin blocks."""
        text = torch.div(pos - sink, self.block, rounding_mode="floor") % self.size
        return torch.where(pos < sink, torch.zeros_like(pos), text)

    def __call__(self, stream: DecodeCache, st: dict, q, k, v, log_forget=None, *, window, sink: int, scale=None,
                 store: bool = True, trim: bool = True) -> torch.Tensor:
        t = q.shape[1]
        q_pos = torch.arange(stream.length, stream.length + t, device=q.device)
        c_q = None
        if store:
            mine = self.owner(q_pos, sink) == self.rank
            _append(st, "pos", q_pos[mine], 0)
            _append(st, "k", k[:, mine])
            _append(st, "v", v[:, mine])
            if log_forget is not None:
                lf = log_forget.to(torch.promote_types(log_forget.dtype, torch.float32))
                c_q = st.get("c_total", torch.zeros_like(lf[:, 0]))[:, None] + lf.cumsum(1)
                st["c_total"] = c_q[:, -1]
                _append(st, "c", c_q[:, mine])
        o = tree_decode_attention(q, st["k"], st["v"], self.group, q_pos=q_pos, k_pos=st["pos"], scale=scale,
                                  window=window, sink=sink, c_q=c_q, c_k=st.get("c") if c_q is not None else None,
                                  levels=self.levels)
        if trim and window is not None:  # keys no later query can see: older than the window, not sinks
            keep = (st["pos"] < sink) | (st["pos"] > q_pos[-1] - window)
            for key in ("k", "v", "c"):
                if key in st:
                    st[key] = st[key][:, keep]
            st["pos"] = st["pos"][keep]
        return o


def _append(st: dict, key: str, new: torch.Tensor, dim: int = 1) -> None:
    st[key] = new if key not in st else torch.cat([st[key], new], dim)


def sharded_decode_cache(group, block: int = 64, node_size: Optional[int] = None) -> DecodeCache:
    """An empty ``DecodeCache`` whose attention KV is sharded over ``group`` (every rank must call
    ``decode_step`` with the same tokens). Recurrent states stay whole on every rank."""
    return DecodeCache(attend=ShardedKV(group, block, node_size))


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    cache: DecodeCache) -> torch.Tensor:
    """Greedy continuation of ``input_ids [B, T]`` by ``max_new_tokens`` with ``cache`` (e.g. sharded):
    ``[B, T + n]`` int64, the same on every rank."""
    model.eval()
    ids, new = input_ids, input_ids
    for _ in range(max_new_tokens):
        nxt = decode_step(model, new, cache)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        new = nxt[:, None]
    return ids
