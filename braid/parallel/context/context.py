"""The context-parallel ops object mixers see as ``seq.ops`` during a forward.

``ContextParallel`` is attached to a built model by :func:`braid.parallel.context.apply_cp`; at every
forward ``HybridLM`` calls ``bind(local_text_len, meta_tokens)`` and puts the returned ``CPSeq`` in
``SeqInfo.ops``. Mixers stay plain PyTorch: where a sequence-mixing op would see the whole sequence at
cp = 1, they call the same-named method of ``seq.ops`` with their local tensors, and it returns exactly
what the cp = 1 op would have returned for the local positions.

Local tensors are ``[B, M + T_local, ...]``: the ``M`` meta tokens (replicated on every rank) then the
rank's text segments (see ``layout.py``) in global order.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from braid.parallel.context.comm import group_rank, group_size
from braid.parallel.context.layout import CPLayout

KINDS = ("ring", "s2", "tree", "ulysses")

# Where each cp_kind's attention lives (module, function); imported on first use.
_ATTENTION = {
    "ring": ("braid.parallel.context.ring", "ring_attention"),
    "s2": ("braid.parallel.context.s2_shard", "s2_attention"),
    "tree": ("braid.parallel.context.tree", "tree_attention"),
    "ulysses": ("braid.parallel.context.ulysses", "ulysses_attention"),
}


def _fn(module: str, name: str):
    return getattr(importlib.import_module(module), name)


class ContextParallel:
    """Per-model settings: the cp process group, the kind (ring | s2 | tree | ulysses) and the layout."""

    def __init__(self, group, kind: str = "ring", layout: str = "zigzag", node_size: Optional[int] = None):
        if kind not in KINDS:
            raise ValueError(f"parallel.cp_kind {kind!r} is unknown (allowed: {', '.join(KINDS)})")
        self.group, self.kind, self.layout_kind = group, kind, layout
        self.size, self.rank = group_size(group), group_rank(group)
        # Ranks per node for the topology-aware tree reduction (None: all in one node).
        self.node_size = node_size

    def layout(self, seq_len: int) -> CPLayout:
        """The layout of a global text length ``seq_len``."""
        return CPLayout(seq_len, self.size, self.rank, self.layout_kind)

    def shard_batch(self, batch: dict) -> dict:
        """This rank's part of a micro-batch of global sequences (every ``[B, T]`` entry sharded along T);
        ``position_ids`` stay global positions."""
        t = batch["input_ids"].shape[1]
        lay = self.layout(t)
        if "position_ids" not in batch or batch["position_ids"] is None:
            batch = dict(batch, position_ids=torch.arange(t, device=batch["input_ids"].device)
                         .expand_as(batch["input_ids"]))
        return {k: (lay.shard(v, 1) if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == t else v)
                for k, v in batch.items()}

    def bind(self, local_len: int, meta: int) -> "CPSeq":
        return CPSeq(self, self.layout(local_len * self.size), meta)


class CPSeq:
    """One forward's view: ``layout`` (global text length), ``meta`` tokens, group, kind."""

    def __init__(self, cp: ContextParallel, layout: CPLayout, meta: int):
        self.cp, self.layout, self.meta = cp, layout, meta
        self.group, self.kind, self.size, self.rank = cp.group, cp.kind, cp.size, cp.rank

    def attention(self, q, k, v, *, causal: bool = True, scale: Optional[float] = None, window=None, sink: int = 0,
                  doc_ids=None, log_forget=None, s2=None, backend: str = "auto") -> torch.Tensor:
        """``braid.kernels.attention`` over the global sequence, for the local queries.

        q ``[B, M+T_loc, Hq, D]``, k/v ``[B, M+T_loc, Hkv, D/Dv]``, doc_ids ``[B, M+T_loc]`` (meta: −1),
        log_forget ``[B, M+T_loc, Hq]`` (forget gates, local; the global cumulative sum is built here).
        ``sink`` must be the meta tokens (the only sinks braid has)."""
        if not causal:
            raise ValueError("context parallelism supports causal attention only")
        if sink not in (0, self.meta):
            raise ValueError(f"context parallelism: sink={sink} must equal the meta tokens ({self.meta})")
        fn = _fn(*_ATTENTION[self.kind])
        return fn(self, q, k, v, scale=scale, window=window, doc_ids=doc_ids, log_forget=log_forget, s2=s2,
                  backend=backend)

    # ---- recurrent and locally-mixing ops (state passing: state.py, halo exchange: halo.py)

    def local_mix(self, fn, n: int, *xs):
        """``fn(*xs)`` as on the whole sequence, for an ``fn`` whose output rows read at most ``n``
        rows back plus the meta rows (short convs, token shift). xs: ``[B, M+T_loc, ...]`` or None;
        ``fn`` receives each local segment as ``[meta, n-row halo, segment]`` (segments stacked along
        the batch) and returns a tensor or a tuple; the result has the local shape."""
        from braid.parallel.context.halo import local_mix

        return local_mix(self, fn, n, *xs)

    def kda(self, q, k, v, g, beta, *, scale: Optional[float] = None, chunk_size: int = 64, doc_ids=None,
            backend: str = "auto") -> torch.Tensor:
        """``braid.kernels.kda`` (zero initial state) over ``[meta, text]``, for the local rows; with doc_ids
        every document starts from the state after the meta tokens (zeros without meta tokens), as the K
        mixer does at cp = 1 (``braid.models.seq_ops.kda_behind_meta``).

        q/k/g ``[B, M+T_loc, H, K]``, v ``[B, M+T_loc, H, V]``, beta ``[B, M+T_loc, H]``, doc_ids
        ``[B, M+T_loc]`` or None → o ``[B, M+T_loc, H, V]`` in v's dtype (no final state)."""
        from braid.parallel.context.state import kda_cp

        return kda_cp(self, q, k, v, g, beta, scale=scale, chunk_size=chunk_size, doc_ids=doc_ids, backend=backend)

    def selective_scan(self, u, dt, A, B, C, D=None, z=None, *, doc_ids=None, chunk_size: int = 64,
                       backend: str = "auto") -> torch.Tensor:
        """The Mamba-1 selective scan over ``[meta, text]`` for the local rows: one scan from zeros without
        doc_ids; with doc_ids every document start restarts from the state after the meta tokens
        (zeros without meta). u/dt/z ``[B, M+T_loc, C]``, B/C ``[B, M+T_loc, N]``, A ``[C, N]``, D
        ``[C]`` → y ``[B, M+T_loc, C]`` in u's dtype."""
        from braid.parallel.context.state import selective_scan_cp

        return selective_scan_cp(self, u, dt, A, B, C, D, z, doc_ids=doc_ids, chunk_size=chunk_size,
                                 backend=backend)
