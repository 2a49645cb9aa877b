"""State passing for recurrent mixers (KDA, Mamba-1 SSM) across context-parallel ranks.

A segment acts on the state it receives as an affine map ``S_end = P·S_in + c``. Every rank
computes the maps of its segments in one pass of the op (segments stacked along the batch), the
maps are all-gathered (differentiably), every rank chains them in global order from the state the
meta tokens leave (zeros without meta tokens), and each local segment's output is corrected by
the exact contribution of its true incoming state. A segment whose first token starts a document
gets ``P = 0``: the state does not cross the boundary, as at cp = 1.

KDA (state ``[K, V]`` per head, transition ``(I − β k kᵀ)·Diag(e^g)``, one K×K matrix for all V
columns): the op runs on values ``[v | 0_K]`` from the initial state ``[0 | I_K]`` (``[S_r | 0]``
where the segment starts a document), documents inside the segment restarting from ``[S_r | 0]``,
with ``S_r`` the state after the meta tokens (zeros without). Columns are independent, so the final
state is ``[c | P]`` and the output is ``[o⁰ | q̃ᵀP_t]``; the true output is ``o⁰ + (q̃ᵀP_t)·S_in``.
One pass, no recomputation.

SSM (``h_t = a_t·h_{t−1} + b_t`` per channel and state, restart at document starts from the
state after the meta tokens ``h_r``): the op runs from ``h_r`` (the true restart value) with the
segment's resets; the incoming state then adds ``D_t·(h_in − h_r)`` with ``D_t = Π_{j≤t} a_j`` up to
the first reset, which is a second scan with zero input from ``h_in − h_r`` (O(T) memory, no
``[T, C, N]`` tensors kept), masked after the first reset.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from braid.kernels.kda import kda
from braid.kernels.ssm import DEFAULT_CHUNK, selective_scan
from braid.parallel.collectives import all_gather
from braid.parallel.context.halo import segment_starts


def chain_states(cps, maps: torch.Tensor, first: torch.Tensor, step: Callable, label: str) -> torch.Tensor:
    """The state entering each local segment.

    maps: ``[B, nseg, ...]`` this rank's segment maps; first: the state entering global position 0;
    step(map ``[B, ...]``, state) → the state after that segment. Returns ``[B, nseg, *state]``."""
    every = all_gather(maps, cps.group, label)  # [cp, B, nseg, ...]
    nseg = len(cps.layout.local)
    incoming, running = {}, first
    for r, i in cps.layout.global_order():
        if r == cps.rank:
            incoming[i] = running
            if len(incoming) == nseg:
                break
        running = step(every[r][:, i], running)
    out = torch.stack([incoming[i] for i in range(nseg)], 1)
    # The all-gather's backward is a collective: every rank must run it, also one whose segments
    # read no other rank's map (contiguous rank 0). An empty slice ties it into the graph at no cost.
    return out + every.flatten()[:0].sum()


def _stack(cps, x: torch.Tensor) -> torch.Tensor:
    """Local text rows ``[B, M+T_loc, ...]`` → segments along the batch ``[nseg·B, L, ...]`` (segment-major)."""
    nseg = len(cps.layout.local)
    return x[:, cps.meta:].unflatten(1, (nseg, -1)).movedim(1, 0).flatten(0, 1)


def _unstack(cps, x: torch.Tensor) -> torch.Tensor:
    """``[nseg·B, L, ...]`` → ``[B, nseg·L, ...]``."""
    nseg = len(cps.layout.local)
    return x.unflatten(0, (nseg, -1)).movedim(0, 1).flatten(1, 2)


def kda_cp(cps, q, k, v, g, beta, *, scale: Optional[float] = None, chunk_size: int = 64,
           doc_ids: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``braid.kernels.kda`` over ``[meta, text]`` for the local rows, documents restarting from the
    state after the meta tokens (``braid.models.seq_ops.kda_behind_meta``; see ``CPSeq.kda``)."""
    m, nseg = cps.meta, len(cps.layout.local)
    b, _, h, dk = k.shape
    dv = v.shape[-1]
    acc = torch.promote_types(v.dtype, torch.float32)
    kw = dict(scale=scale, chunk_size=chunk_size, backend=backend)
    if m:
        o_meta, s_meta = kda(q[:, :m], k[:, :m], v[:, :m], g[:, :m], beta[:, :m], output_final_state=True,
                             doc_ids=None if doc_ids is None else doc_ids[:, :m], **kw)
    else:
        s_meta = torch.zeros(b, h, dk, dv, dtype=acc, device=v.device)
    keep = (~segment_starts(cps, doc_ids, b, v.device)).T.to(acc)[..., None, None, None]  # [nseg, B, 1, 1, 1]
    eye = torch.eye(dk, dtype=acc, device=v.device)
    # A segment starting a document starts from the state after the meta tokens (zeros without).
    init = torch.cat([(1 - keep) * s_meta.to(acc), (keep * eye).expand(nseg, b, h, dk, dk)], -1)
    restart = None  # so do documents starting inside a segment: [S_r | 0]
    if doc_ids is not None and m:
        restart = torch.cat([s_meta.to(acc), s_meta.new_zeros(b, h, dk, dk, dtype=acc)], -1).repeat(nseg, 1, 1, 1)
    vs = _stack(cps, v).to(acc)
    v_ext = torch.cat([vs, vs.new_zeros(*vs.shape[:-1], dk)], -1)
    o_ext, s_ext = kda(_stack(cps, q), _stack(cps, k), v_ext, _stack(cps, g), _stack(cps, beta),
                       initial_state=init.flatten(0, 1), output_final_state=True,
                       doc_ids=None if doc_ids is None else _stack(cps, doc_ids),
                       restart_state=restart, **kw)
    maps = s_ext.unflatten(0, (nseg, b)).movedim(0, 1)  # [B, nseg, H, K, V+K] = [c | P]
    s_in = chain_states(cps, maps, s_meta.to(acc), lambda mp, s: mp[..., :dv] + mp[..., dv:] @ s, "kda.state")
    s_in = s_in.movedim(1, 0).flatten(0, 1)  # [nseg·B, H, K, V]
    o = o_ext[..., :dv] + torch.einsum("blhk,bhkv->blhv", o_ext[..., dv:], s_in)
    o = _unstack(cps, o).to(v.dtype)
    return torch.cat([o_meta, o], 1) if m else o


def selective_scan_cp(cps, u, dt, A, B, C, D=None, z=None, *, doc_ids: Optional[torch.Tensor] = None,
                      chunk_size: int = DEFAULT_CHUNK, backend: str = "auto") -> torch.Tensor:
    """The SSM over ``[meta, text]`` for the local rows (see ``CPSeq.selective_scan``)."""
    m, nseg = cps.meta, len(cps.layout.local)
    bsz, _, ch = u.shape
    acc = torch.promote_types(u.dtype, torch.float32)
    kw = dict(chunk_size=chunk_size, backend=backend)
    if m:
        y_meta, h_meta = selective_scan(u[:, :m], dt[:, :m], A, B[:, :m], C[:, :m], D,
                                        None if z is None else z[:, :m], output_final_state=True, **kw)
        h_meta = h_meta.to(acc)
    else:
        h_meta = torch.zeros(bsz, ch, A.shape[1], dtype=acc, device=u.device)
    # Documents restart from the state after the meta tokens; without documents nothing restarts.
    h_r = h_meta if doc_ids is not None and m else None
    h_r_seg = None if h_r is None else h_r.repeat(nseg, 1, 1)
    reset = alive = None
    if doc_ids is not None:
        docs = _stack(cps, doc_ids)
        reset = torch.ones_like(docs, dtype=torch.bool)
        reset[:, 1:] = docs[:, 1:] != docs[:, :-1]
        reset[:, 0] = segment_starts(cps, doc_ids, bsz, u.device).T.flatten()
        alive = reset.cumsum(1) == 0  # still in the document the incoming state belongs to
    us, dts, bs, cs = (_stack(cps, x) for x in (u, dt, B, C))
    zs = None if z is None else _stack(cps, z)
    y0, h_end = selective_scan(us, dts, A, bs, cs, D, zs, initial_state=h_r_seg, reset=reset,
                               output_final_state=True, **kw)
    decay = torch.exp(dts.to(acc).sum(1)[..., None] * A.to(acc))  # Π_t a_t, [nseg·B, C, N]
    if alive is not None:
        decay = decay * alive[:, -1, None, None].to(acc)
    const = h_end.to(acc) - (0 if h_r_seg is None else decay * h_r_seg)
    maps = torch.stack([decay, const], 1).unflatten(0, (nseg, bsz)).movedim(0, 1)  # [B, nseg, 2, C, N]
    h_in = chain_states(cps, maps, h_meta, lambda mp, h: mp[:, 0] * h + mp[:, 1], "ssm.state")
    delta = h_in.movedim(1, 0).flatten(0, 1) - (0 if h_r_seg is None else h_r_seg)
    y_in = selective_scan(torch.zeros_like(us), dts, A, bs, cs, None, zs, initial_state=delta, **kw)
    if alive is not None:
        y_in = y_in * alive[..., None].to(y_in.dtype)
    y = _unstack(cps, y0 + y_in)
    return torch.cat([y_meta, y], 1) if m else y


def state_comm_bytes(cps_size: int, batch: int, n_segments: int, map_elems: int) -> dict[str, int]:
    """Bytes one rank sends for one state-passing op (forward + backward), by COUNTER label suffix.

    ``map_elems``: fp32 elements of one segment's map per row: KDA ``H·K·(V+K)`` (``[c | P]``), SSM
    ``2·C·N`` (decay product and state). Forward all-gathers the maps: every other rank gets this
    rank's; backward reduce-scatters the gathered gradient: every other rank gets its slice of it,
    which has the size of one rank's maps."""
    n = cps_size
    local = batch * n_segments * map_elems * 4
    return {"": (n - 1) * local, ".grad": (n - 1) * local}
