"""The sequence-mixing ops a mixer calls through ``seq.ops``, on one device.

A mixer never asks whether the sequence is sharded: it calls ``seq.ops.attention``, ``seq.ops.kda``,
``seq.ops.selective_scan`` or ``seq.ops.local_mix`` with its local tensors. :class:`LocalOps` (the
default of ``SeqInfo.ops``) runs the ops of ``braid.kernels`` over the whole sequence; under context
parallelism ``SeqInfo.ops`` is the per-forward ``braid.parallel.context.CPSeq``, whose same-named
methods take the same arguments and return the same local rows.

Meta tokens and documents follow one rule for the recurrent ops: the meta prefix runs from a zero
state, and every packed document starts from the state after the meta tokens (zeros without
them), so a packed document computes exactly what it computes alone behind the meta tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from braid.kernels import attention, kda, selective_scan
from braid.models.doc_boundaries import document_starts


def kda_behind_meta(q, k, v, g, beta, meta_tokens: int, doc_ids: Optional[torch.Tensor], **kw) -> torch.Tensor:
    """``braid.kernels.kda`` over ``[meta, text]`` (zero initial state) where every document of the
    text starts from the state after the meta tokens, as it would alone behind them.

    Shapes as ``kda``; doc_ids ``[B, T]`` (meta: −1) or None; ``kw`` go to ``kda``. Returns o."""
    m = meta_tokens
    if doc_ids is None or m == 0 or m >= k.shape[1]:
        return kda(q, k, v, g, beta, doc_ids=doc_ids, **kw)[0]
    o_meta, s_meta = kda(q[:, :m], k[:, :m], v[:, :m], g[:, :m], beta[:, :m], output_final_state=True, **kw)
    o_text, _ = kda(q[:, m:], k[:, m:], v[:, m:], g[:, m:], beta[:, m:], initial_state=s_meta,
                    restart_state=s_meta, doc_ids=doc_ids[:, m:], **kw)
    return torch.cat([o_meta, o_text], 1)


def scan_behind_meta(u, dt, A, B, C, D, z, meta_tokens: int, doc_ids: Optional[torch.Tensor], **kw) -> torch.Tensor:
    """``braid.kernels.selective_scan`` over ``[meta, text]`` from zeros; with doc_ids every document
    start restarts from the state after the meta tokens (zeros without them). Shapes as
    ``selective_scan``; ``kw`` go to it. Returns y."""
    m = meta_tokens
    reset = None if doc_ids is None else document_starts(doc_ids, m)
    if reset is None or m == 0 or m >= u.shape[1]:
        return selective_scan(u, dt, A, B, C, D, z, reset=reset, **kw)
    z_meta, z_text = (None, None) if z is None else (z[:, :m], z[:, m:])
    y_meta, h_meta = selective_scan(u[:, :m], dt[:, :m], A, B[:, :m], C[:, :m], D, z_meta,
                                    output_final_state=True, **kw)
    y_text = selective_scan(u[:, m:], dt[:, m:], A, B[:, m:], C[:, m:], D, z_text, initial_state=h_meta,
                            reset=reset[:, m:], **kw)
    return torch.cat([y_meta, y_text], 1)


class LocalOps:
    """``seq.ops`` for a forward that holds whole sequences: ``[B, M + T, ...]`` with the ``meta``
    tokens first. Signatures are those of ``braid.parallel.context.CPSeq``."""

    def __init__(self, meta_tokens: int = 0):
        self.meta = meta_tokens

    def attention(self, q, k, v, **kw) -> torch.Tensor:
        """``braid.kernels.attention`` (same arguments)."""
        return attention(q, k, v, **kw)

    def local_mix(self, fn, n: int, *xs):
        """``fn(*xs)``: an op whose output rows read at most ``n`` rows back (plus the meta rows) needs
        nothing more when the whole sequence is here."""
        return fn(*xs)

    def kda(self, q, k, v, g, beta, *, scale: Optional[float] = None, chunk_size: int = 64, doc_ids=None,
            backend: str = "auto") -> torch.Tensor:
        """KDA from a zero state over ``[meta, text]``, documents behind the meta tokens
        (:func:`kda_behind_meta`) → o ``[B, M+T, H, V]``."""
        return kda_behind_meta(q, k, v, g, beta, self.meta, doc_ids, scale=scale, chunk_size=chunk_size,
                               backend=backend)

    def selective_scan(self, u, dt, A, B, C, D=None, z=None, *, doc_ids=None, chunk_size: int = 64,
                       backend: str = "auto") -> torch.Tensor:
        """The Mamba-1 scan over ``[meta, text]``, documents behind the meta tokens
        (:func:`scan_behind_meta`) → y ``[B, M+T, C]``."""
        return scan_behind_meta(u, dt, A, B, C, D, z, self.meta, doc_ids, chunk_size=chunk_size, backend=backend)
