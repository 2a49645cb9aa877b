"""Chunked KDA (Kimi Delta Attention) in plain torch: the training path.

Within a chunk of C tokens the delta rule is solved in closed form (WY/UT transform): with Γ the
within-chunk cumulative sum of the log decay g (per key channel) and u'_t the "pseudo-values",

    S_t = Diag(e^{Γ_t}) S_0 + Σ_{j≤t} Diag(e^{Γ_t − Γ_j}) k_j u'_jᵀ
    (I + A) U' = Diag(β) (V − (K ⊙ e^Γ) S_0),   A[i, j] = β_i Σ_d k_id k_jd e^{Γ_id − Γ_jd}  (j < i)

so U' = u − w S_0 with u = (I + A)⁻¹ Diag(β) V and w = (I + A)⁻¹ Diag(β) (K ⊙ e^Γ). All chunks are
transformed at once (one batched triangular solve); only the state update runs chunk by chunk.

Overflow: e^{Γ_i − Γ_j} ≤ 1 for j ≤ i, but splitting it into e^{Γ_i} · e^{−Γ_j} overflows for strong
decays (Γ reaches −1000s over a chunk). Pairs in different sub-chunks use a reference point r
between them (e^{Γ_i − Γ_r} · e^{Γ_r − Γ_j}, both factors ≤ 1); pairs inside one sub-chunk form the
exponent difference explicitly. Memory stays O(T · (sub_chunk + C / sub_chunk) · K), never O(T²).

Packed documents: pair scores are masked to same-document pairs, rows of the chunk's first document
read the incoming state, later documents start from the restart state (zeros, or e.g. the state after
meta tokens) with decays measured from their own start (``_restart_terms``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _pair_scores(rows: list[torch.Tensor], b: torch.Tensor, gam: torch.Tensor, sub: int) -> list[torch.Tensor]:
    """Decayed within-chunk scores ``M[i, j] = Σ_d a_id b_jd e^{Γ_id − Γ_jd}`` for ``j ≤ i``, else 0.

    Args:
        rows: S tensors ``a`` ``[..., N, C, K]`` of row vectors, all scored against the same keys.
        b: ``[..., N, C, K]`` key vectors; gam: ``[..., N, C, K]`` within-chunk cumsum of g (≤ 0 steps).
        sub: sub-chunk size dividing C.
    Returns:
        S tensors ``[..., N, C, C]`` in the dtype of ``b``.
    """
    *lead, n, c, k = b.shape
    ns, nr = c // sub, len(rows)
    a5 = [a.reshape(*lead, n, ns, sub, k) for a in rows]
    b5 = b.reshape(*lead, n, ns, sub, k)
    g5 = gam.reshape(*lead, n, ns, sub, k)

    # Diagonal sub-chunk blocks: explicit exponent differences, masked before exp (j > i would overflow).
    diff = g5.unsqueeze(-2) - g5.unsqueeze(-3)  # [..., N, ns, sub(i), sub(j), K]
    causal = torch.ones(sub, sub, dtype=torch.bool, device=b.device).tril()
    keys = b5.unsqueeze(-3) * torch.exp(diff.masked_fill(~causal[..., None], float("-inf")))
    # The decayed keys of each (i, j) pair are shared by all row sets: contract K against [K, S].
    diag = keys @ torch.stack(a5, dim=-1)  # [..., N, ns, sub(i), sub(j), S]
    eye = torch.eye(ns, dtype=b.dtype, device=b.device)[:, None, :, None, None]
    full = (diag.unsqueeze(-3) * eye).reshape(*lead, n, c, c, nr)  # block-diagonal
    if ns > 1:
        # Reference point r_I = first position of row sub-chunk I. Rows i ≥ r_I: e^{Γ_i − Γ_r} ≤ 1;
        # keys j < r_I: e^{Γ_r − Γ_j} ≤ 1. Keys j ≥ r_I (same or later sub-chunk, whose exponent could
        # overflow) get exponent −inf: exactly zero, in the forward and the backward pass.
        ref = g5[..., :1, :]  # [..., N, ns, 1, K]
        row_decay = torch.exp(g5 - ref)
        a_dec = torch.cat([a * row_decay for a in a5], dim=-2)  # [..., N, ns, S·sub, K]
        earlier = torch.arange(c, device=b.device)[None, :] < torch.arange(0, c, sub, device=b.device)[:, None]
        key_exp = (ref - gam.unsqueeze(-3)).masked_fill(~earlier[..., None], float("-inf"))
        b_dec = b.unsqueeze(-3) * torch.exp(key_exp)  # [..., N, ns, C, K]
        off = (a_dec @ b_dec.transpose(-1, -2)).reshape(*lead, n, ns, nr, sub, c)
        full = full + off.movedim(-3, -1).reshape(full.shape)  # zero on and above the diagonal blocks
    return list(full.unbind(-1))


def _doc_masks(seg: torch.Tensor, n: int, c: int):
    """Masks that reset the state at document starts.

    Args:
        seg: ``[B, N·C]`` (already padded) segment index, non-decreasing along each row.
    Returns:
        same ``[B, 1, N, C, C]`` (i, j in one document), carry ``[B, 1, N, C, 1]`` (row i still in the
        document the chunk started in, so it sees the incoming state), last ``[B, 1, N, C, 1]`` (key j
        in the document of the chunk's last token, so it reaches the outgoing state), carry_last
        ``[B, 1, N, 1]`` (no document starts inside the chunk).
    """
    d = seg.reshape(seg.shape[0], 1, n, c)
    same = d[..., :, None] == d[..., None, :]
    # prev[n] = segment of chunk n-1's last token (chunk 0: its own first, so the initial state carries in).
    prev = torch.cat([d[:, :, :1, :1], d[:, :, :-1, -1:]], dim=2)
    carry = (d == prev).to(torch.int32).cumprod(-1).bool()
    last = d == d[..., -1:]
    return same, carry[..., None], last[..., None], carry[..., -1:]


def _restart_terms(q, k, gam, seg, restart_state, n, c):
    """What the restart state contributes to chunks in which documents start (see ``kda_chunk``).

    A row whose document starts inside its chunk (at position j0; "restart rows") reads the restart
    state S_r instead of the chunk's incoming state, with decays measured from its document start:
    the chunk algorithm with Γ − Γ_{j0−1} in place of Γ. Pair scores only use differences of Γ and are
    unchanged; what changes is linear in S_r and is added outside the chunk loop:

        v ← v − restart·(k ⊙ e^{Γ−Γ_ref}) S_r    (the WY right-hand side: u − w S_r = T β (v − K̃ S_r))
        o ← o + restart·(q ⊙ e^{Γ−Γ_ref}) S_r
        S_{n+1} ← S_{n+1} + d_r ⊙ S_r,  d_r = restart_last · e^{Γ_last − Γ_ref,last}

    All exponents are ≤ 0 (Γ_ref is at or before the row), so strong decays cannot overflow.

    Args:
        q (scaled), k, gam: ``[B, H, N, C, K]``; seg ``[B, N·C]`` segment index; restart_state
            ``[B, H, K, V]`` in the compute dtype.
    Returns:
        ``(x_r [B,H,N,C,V] to subtract from v, o_r [B,H,N,C,V] to add to o, d_r [B,H,N,K])``.
    """
    d = seg.reshape(seg.shape[0], 1, n, c)
    prev = torch.cat([d[:, :, :1, :1], d[:, :, :-1, -1:]], dim=2)  # as in _doc_masks
    restart = d != prev  # [B, 1, N, C]: segments are non-decreasing, so this is "not carry"
    starts = d != torch.cat([prev, d[..., :-1]], dim=-1)  # a document starts at this position
    pos = torch.arange(c, device=seg.device)
    j0 = torch.where(starts, pos, 0).cummax(-1).values  # the row's document start (0: chunk start)
    # Γ_ref = Γ_{j0−1}, with Γ_{−1} = 0: index j0 of Γ padded by one zero row in front.
    gam0 = F.pad(gam, (0, 0, 1, 0))
    ref = gam0.gather(-2, j0.expand(*gam.shape[:-1])[..., None].expand_as(gam))
    e = torch.exp(gam - ref) * restart[..., None].to(gam.dtype)
    s_r = restart_state[:, :, None]  # [B, H, 1, K, V]
    x_r, o_r = (k * e) @ s_r, (q * e) @ s_r
    d_r = e[..., -1, :]  # the last row: restart_last · e^{Γ_last − Γ_ref,last}
    return x_r, o_r, d_r


def _kda_chunk_triton(q, k, v, gam, beta, seg, initial_state, restart, output_final_state, t, out_dtype):
    """The Triton path: intra-chunk transform and state recurrence as kernels (fp32).

    q (scaled), k, v, gam: ``[B, H, N, C, *]``; beta ``[B, H, N, C]``; seg ``[B, N·C]`` or None;
    restart: ``(restart_state, x_r, o_r, d_r)`` of ``_restart_terms`` or None.
    """
    from braid.kernels.triton import load

    kda_intra = load("kda_intra", interpret=not k.is_cuda).kda_intra
    kda_state_recurrence = load("kda_state", interpret=not k.is_cuda).kda_state_recurrence
    b, h, n, c, dk = k.shape
    dv = v.shape[-1]
    seg_c = prev = None
    if seg is not None:
        seg_c = seg.reshape(b, n, c).to(torch.int32).contiguous()
        # The segment of the token before each chunk (chunk 0: its own first, so the initial state carries in).
        prev = torch.cat([seg_c[:, :1, 0], seg_c[:, :-1, -1]], dim=1).contiguous()
    s_r = d_r = None
    if restart is not None:
        s_r, x_r, o_r, d_r = restart
        v = v - x_r
    w, u, p_mat, q_in, k_out, decay = kda_intra(q, k, v, gam, beta, seg_c, prev)
    s0 = torch.zeros(b, h, dk, dv, dtype=torch.float32, device=k.device) if initial_state is None \
        else initial_state.float()
    o, s = kda_state_recurrence(w, q_in, u, p_mat, decay, k_out, s0, d_r, s_r)
    if restart is not None:
        o = o + o_r
    o = o.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, dv)[:, :t]
    return o.to(out_dtype), (s if output_final_state else None)


def kda_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    sub_chunk: int = 8,
    doc_ids: Optional[torch.Tensor] = None,
    restart_state: Optional[torch.Tensor] = None,
    state_backend: str = "torch",
):
    """Chunked KDA forward (autograd provides the backward).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: ``[B, T, H, K]`` log decay (≤ 0: the
            overflow-free factorisation relies on it);
        beta: ``[B, T, H]``; initial_state: ``[B, H, K, V]`` or None (zeros).
        scale: query scale. chunk_size: C. sub_chunk: must divide C (else C is used).
        doc_ids: ``[B, T]`` or None; the state is reset before each token whose id differs from the
            previous token's (the initial state feeds the first document).
        restart_state: ``[B, H, K, V]``: the state a document start resets to (None: zeros; unused
            without doc_ids). Hymba-style meta tokens: the state after them, so that every document
            starts behind the meta tokens.
        state_backend: ``"torch"`` (this function) or ``"triton"``: the intra-chunk transform
            (``braid.kernels.triton.kda_intra``) and the inter-chunk state recurrence
            (``braid.kernels.triton.kda_state``) as Triton kernels, forward and backward, in fp32;
            needs a power-of-two ``chunk_size`` ≥ 16.
    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] or None)``; all arithmetic in fp32,
        or fp64 when any input is fp64; the state is returned in that compute dtype.
    """
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    dtypes = [x.dtype for x in (q, k, v, g, beta, initial_state, restart_state) if x is not None]
    cdt = torch.float64 if torch.float64 in dtypes else torch.float32
    out_dtype, c = v.dtype, chunk_size
    sub = sub_chunk if 0 < sub_chunk <= c and c % sub_chunk == 0 else c
    pad = (-t) % c
    n = (t + pad) // c

    def prep(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, D] → [B, H, N, C, D]; zero padding makes the padded tokens no-ops (g=0, β=0, k=0).
        x = F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad))
        return x.reshape(b, n, c, h, -1).permute(0, 3, 1, 2, 4)

    q, k, v, g = prep(q) * scale, prep(k), prep(v), prep(g)
    beta = prep(beta.unsqueeze(-1))  # [B, H, N, C, 1]
    gam = g.cumsum(-2)  # Γ within each chunk

    same = carry = last = carry_last = seg = None
    if doc_ids is not None:
        # Segment index (counts document starts) so that a repeated id never joins two documents;
        # the padding continues the last segment.
        starts = torch.ne(doc_ids[:, 1:], doc_ids[:, :-1]).to(torch.int64)
        seg = F.pad(starts, (1, 0)).cumsum(-1)
        seg = F.pad(seg, (0, pad), mode="replicate") if pad else seg
        if state_backend != "triton":
            same, carry, last, carry_last = _doc_masks(seg, n, c)
    restart = None
    if seg is not None and restart_state is not None:
        s_r = restart_state.to(cdt)
        restart = (s_r, *_restart_terms(q, k, gam, seg, s_r, n, c))
    if state_backend == "triton":
        return _kda_chunk_triton(q, k, v, gam, beta[..., 0], seg, initial_state, restart, output_final_state,
                                 t, out_dtype)

    # Both score matrices share the keys and decays: rows [β k ; q] in one pass.
    a_mat, p_mat = _pair_scores([k * beta, q], k, gam, sub)  # [B, H, N, C, C] each
    a_mat = a_mat.tril(-1)  # A is strictly lower; p_mat keeps j ≤ i (the intra-chunk output weights)
    if same is not None:
        a_mat, p_mat = a_mat * same, p_mat * same

    decay_k = k * torch.exp(gam)
    if carry is not None:
        decay_k = decay_k * carry
    if restart is not None:
        v = v - restart[1]  # restart rows: the restart state's prediction leaves the right-hand side
    rhs = torch.cat([decay_k, v], dim=-1) * beta
    # (I + A) X = rhs, unit lower-triangular: one batched forward substitution for all chunks.
    wu = torch.linalg.solve_triangular(a_mat, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :dk], wu[..., dk:]

    q_in = q * torch.exp(gam)  # reads the incoming state
    g_last = gam[..., -1:, :]  # [B, H, N, 1, K]
    k_out = k * torch.exp(g_last - gam)  # writes the outgoing state
    state_decay = torch.exp(g_last).transpose(-1, -2)  # [B, H, N, K, 1]
    if carry is not None:
        q_in = q_in * carry
        k_out = k_out * last
        state_decay = state_decay * carry_last[..., None]
    wq = torch.cat([w, q_in], dim=-2)  # [B, H, N, 2C, K]: one matmul against the state per chunk

    s = torch.zeros(b, h, dk, dv, dtype=cdt, device=q.device) if initial_state is None \
        else initial_state.to(cdt)
    # The restart state's share of each chunk-end state (zero where no document starts in the chunk).
    d_r = [None] * n if restart is None else restart[3][..., None].unbind(2)  # [B, H, K, 1] each
    outs = []
    # unbind (not indexing) per chunk: its backward is one stack, where indexing would scatter every
    # chunk's gradient into a fresh full-size zero tensor (O(N²) memory traffic).
    for (wq_i, u_i, p_i, dec_i, k_i), dr_i in zip(zip(*(x.unbind(2) for x in (wq, u, p_mat, state_decay, k_out))),
                                                  d_r):
        ws = wq_i @ s
        v_new = u_i - ws[..., :c, :]
        outs.append(ws[..., c:, :] + p_i @ v_new)
        s = dec_i * s + k_i.transpose(-1, -2) @ v_new
        if dr_i is not None:
            s = s + dr_i * restart[0]
    o = torch.stack(outs, dim=2)  # [B, H, N, C, V]
    if restart is not None:
        o = o + restart[2]
    o = o.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, dv)[:, :t]
    return o.to(out_dtype), (s if output_final_state else None)
