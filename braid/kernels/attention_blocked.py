"""Blocked ("flash") softmax attention in plain torch: online softmax over key blocks, O(T·D) memory.

This is the reference implementation behind ``braid.kernels.attention`` for everything SDPA cannot do
exactly and cheaply (FoX forget gates, long masked sequences, the log-sum-exp output). A Triton
kernel with the same semantics can replace it; the semantics are those of ``partial_attention``.

Layout: GQA groups are handled without repeating K/V. With ``G = Hq / Hkv``, q is viewed as
``[B, Hkv, T, G, D]`` (query head ``h = kv·G + g`` uses kv head ``kv``), so one key block is
multiplied against ``G`` query heads at once; scores of a block are ``[B, Hkv, bt, G, bs]``.
Everything numerical (scores, softmax statistics, accumulators, gradients) is in fp32, or fp64 when
the inputs are fp64 (for gradcheck).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from braid.kernels.s2 import S2Pattern

# Default block sizes: large enough that the python loop is not the bottleneck, small enough that a
# [bt, bs] block of scores per (batch, head) stays far below T².
BLOCK_Q = 128
BLOCK_K = 128


def visibility(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    window: Optional[int],
    sink: int,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
    s2: Optional[S2Pattern] = None,
    heads: Optional[torch.Tensor] = None,
    n_heads: int = 1,
) -> torch.Tensor:
    """Which keys each query may see: the single definition of the attention mask.

    Args:
        q_pos: ``[t]`` int64 query positions; k_pos: ``[s]`` int64 key positions.
        q_doc: ``[B, t]`` / k_doc: ``[B, s]`` document ids, or None (both or neither).
        s2: S2 block pattern (per head), with ``heads`` ``[H]`` int64 local head indices of a call
            with ``n_heads`` query heads.
    Returns:
        bool ``[B or 1, t, s]`` (``[B or 1, H, t, s]`` with s2):
        ``causal_ok ∧ (k_pos < sink ∨ (in_window ∧ same_doc ∧ s2_ok))`` where
        causal_ok = ``k ≤ q`` (always true if not causal), in_window = ``q − k < window`` (and
        ``k − q < window`` when not causal), same_doc = ``q_doc == k_doc``, s2_ok = the S2 block rule.
    """
    qp, kp = q_pos[:, None], k_pos[None, :]
    local = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    if window is not None:
        local = local & ((qp - kp) < window)
        if not causal:
            local = local & ((kp - qp) < window)
    local = local[None]
    if q_doc is not None:
        local = local & (q_doc[:, :, None] == k_doc[:, None, :])
    sinks, before = (kp < sink)[None], (kp <= qp)[None]
    if s2 is not None:  # add the head dim
        local = local[:, None] & s2.token_mask(heads, q_pos, k_pos, n_heads, causal)[None]
        sinks, before = sinks[:, None], before[:, None]
    if sink:
        local = local | sinks
    if causal:
        local = local & before
    return local


def _block_may_be_visible(qa: int, qb: int, ka: int, kb: int, causal: bool, window, sink: int,
                          s2: Optional[S2Pattern] = None, s2_residue: int = 0) -> bool:
    """False when no (query, key) pair of positions [qa, qb] × [ka, kb] can be visible (skip it)."""
    if causal and ka > qb:
        return False
    if ka < sink:
        return True
    if window is not None:
        if qa - kb >= window:  # every key is older than the window of every query
            return False
        if not causal and ka - qb >= window:
            return False
    if s2 is not None and not s2.any_visible(s2_residue, qa, qb, ka, kb, causal):
        return False
    return True


class _Layout:
    """Per-call constants and GQA-grouped views shared by forward and backward."""

    def __init__(self, q, k, v, q_offset, causal, scale, window, sink, q_doc, k_doc, block_q, block_k,
                 s2=None, s2_head=0, s2_n_heads=1):
        self.b, self.t, self.hq, self.d = q.shape
        self.s, self.hkv = k.shape[1], k.shape[2]
        self.dv = v.shape[-1]  # the value head dim may differ from the q/k one (Hymba)
        self.g = self.hq // self.hkv
        self.q_offset, self.causal, self.scale = q_offset, causal, scale
        self.window, self.sink, self.q_doc, self.k_doc = window, sink, q_doc, k_doc
        self.block_q, self.block_k = block_q, block_k
        # S2: every head of this call shares the pattern of head s2_head (of s2_n_heads) of the caller.
        self.s2, self.s2_n_heads = s2, s2_n_heads
        self.s2_head = torch.tensor([s2_head], device=q.device)
        self.s2_residue = 0 if s2 is None else int(s2.residue(s2_head, s2_n_heads))
        self.acc = torch.promote_types(q.dtype, torch.float32)
        self.device = q.device

    def q_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, Hq, ...]`` → ``[B, Hkv, T, G, ...]`` (a view)."""
        return x.unflatten(2, (self.hkv, self.g)).transpose(1, 2)

    def q_heads_back(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, T, G, ...]`` → ``[B, T, Hq, ...]``."""
        return x.transpose(1, 2).flatten(2, 3)

    def blocks(self):
        """Yield ``(t0, t1, [(s0, s1), ...])`` query blocks with their possibly visible key blocks."""
        for t0 in range(0, self.t, self.block_q):
            t1 = min(t0 + self.block_q, self.t)
            qa, qb = self.q_offset + t0, self.q_offset + t1 - 1
            ks = [(s0, min(s0 + self.block_k, self.s)) for s0 in range(0, self.s, self.block_k)]
            ks = [(s0, s1) for s0, s1 in ks
                  if _block_may_be_visible(qa, qb, s0, s1 - 1, self.causal, self.window, self.sink,
                                           self.s2, self.s2_residue)]
            yield t0, t1, ks

    def sink_columns(self, s0: int, s1: int) -> Optional[torch.Tensor]:
        """Bool ``[bs]``: which keys of the block are sinks; None when it has none."""
        if s0 >= self.sink:
            return None
        return torch.arange(s0, s1, device=self.device) < self.sink

    def scores(self, qb, kb, t0, t1, s0, s1, cq, ck):
        """Masked logits ``[B, Hkv, bt, G, bs]`` (−inf where invisible) of one block pair."""
        s = (qb.flatten(2, 3) @ kb.transpose(-1, -2)).unflatten(2, (t1 - t0, self.g)) * self.scale
        if cq is not None:  # FoX: + c_i − c_j, except on sink keys, which never fade
            bias = cq[:, :, t0:t1, :, None] - ck[:, :, None, :, s0:s1]
            sinks = self.sink_columns(s0, s1)
            s = s + (bias if sinks is None else bias.masked_fill(sinks, 0.0))
        q_pos = torch.arange(self.q_offset + t0, self.q_offset + t1, device=self.device)
        k_pos = torch.arange(s0, s1, device=self.device)
        qd = None if self.q_doc is None else self.q_doc[:, t0:t1]
        kd = None if self.k_doc is None else self.k_doc[:, s0:s1]
        vis = visibility(q_pos, k_pos, causal=self.causal, window=self.window, sink=self.sink,
                         q_doc=qd, k_doc=kd, s2=self.s2, heads=self.s2_head, n_heads=self.s2_n_heads)
        vis = vis[:, :, :, None, :] if self.s2 is not None else vis[:, None, :, None, :]
        return s.masked_fill(~vis, float("-inf"))


def _grouped_c(lay: _Layout, c_q, c_k):
    """c_q ``[B,T,Hq]`` → ``[B,Hkv,T,G]``; c_k ``[B,S,Hq]`` → ``[B,Hkv,G,S]`` in the accumulator dtype."""
    if c_q is None:
        return None, None
    cq = lay.q_heads(c_q.to(lay.acc))
    ck = c_k.to(lay.acc).unflatten(2, (lay.hkv, lay.g)).permute(0, 2, 3, 1)
    return cq, ck


def _tiles(lay: _Layout, q: torch.Tensor):
    """The (query block, key blocks) tiles to loop over; none in a rehearsal (``braid.rehearse``): fake tensors
    hold no values, and what the loop allocates lives one tile at a time, as in the GPU's fused kernel, which
    keeps it on chip. The outputs and accumulators allocated around the loop are what a rank holds."""
    return () if is_fake(q) else lay.blocks()


def _forward(lay: _Layout, q, k, v, c_q, c_k) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax over key blocks → o ``[B, T, Hq, D]`` (q's dtype), lse ``[B, Hq, T]`` (acc dtype)."""
    qg, kh, vh = lay.q_heads(q), k.transpose(1, 2), v.transpose(1, 2)
    cq, ck = _grouped_c(lay, c_q, c_k)
    o = torch.zeros(lay.b, lay.hkv, lay.t, lay.g, lay.dv, dtype=lay.acc, device=lay.device)
    lse = torch.full((lay.b, lay.hkv, lay.t, lay.g), float("-inf"), dtype=lay.acc, device=lay.device)
    for t0, t1, kblocks in _tiles(lay, q):
        qb = qg[:, :, t0:t1].to(lay.acc)
        m = torch.full(qb.shape[:-1], float("-inf"), dtype=lay.acc, device=lay.device)
        den = torch.zeros_like(m)
        acc = torch.zeros(*qb.shape[:-1], lay.dv, dtype=lay.acc, device=lay.device)
        for s0, s1 in kblocks:
            s = lay.scores(qb, kh[:, :, s0:s1].to(lay.acc), t0, t1, s0, s1, cq, ck)
            m_new = torch.maximum(m, s.amax(-1))
            # Rows with nothing visible yet keep m = −inf; shift them by 0 so exp gives 0, not NaN.
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            rescale = torch.exp(m - m_safe)
            den = den * rescale + p.sum(-1)
            pv = p.flatten(2, 3) @ vh[:, :, s0:s1].to(lay.acc)
            acc = acc * rescale[..., None] + pv.unflatten(2, (t1 - t0, lay.g))
            m = m_new
        seen = den > 0  # fully masked rows: o = 0, lse = −inf
        safe_den = torch.where(seen, den, 1.0)
        o[:, :, t0:t1] = torch.where(seen[..., None], acc / safe_den[..., None], 0.0)
        lse[:, :, t0:t1] = torch.where(seen, m + torch.log(safe_den), float("-inf"))
    return lay.q_heads_back(o).to(q.dtype), lse.permute(0, 1, 3, 2).flatten(1, 2)


def _backward(lay: _Layout, q, k, v, out, lse, c_q, c_k, d_out, d_lse, want_c: bool):
    """Recompute each block's probabilities from lse → dq, dk, dv (input dtypes), dc_q, dc_k (or None)."""
    qg, kh, vh = lay.q_heads(q), k.transpose(1, 2), v.transpose(1, 2)
    cq, ck = _grouped_c(lay, c_q, c_k)
    if d_out is None:
        d_out = torch.zeros_like(out)
    dog = lay.q_heads(d_out)
    # delta_i = Σ_d dO·O (the softmax-Jacobian term); a gradient on lse_i adds p_ij·dlse_i to dS_ij,
    # which is the same as subtracting dlse_i from delta_i.
    delta = (d_out.to(lay.acc) * out.to(lay.acc)).sum(-1)  # [B, T, Hq]
    if d_lse is not None:
        delta = delta - d_lse.to(lay.acc).transpose(1, 2)
    delta = lay.q_heads(delta)  # [B, Hkv, T, G]
    lse_g = lay.q_heads(lse.to(lay.acc).transpose(1, 2))
    # exp(s − (+inf)) = 0 for fully masked rows (lse = −inf) instead of NaN.
    lse_g = torch.where(torch.isinf(lse_g), float("inf"), lse_g)
    dq = torch.zeros(qg.shape, dtype=lay.acc, device=lay.device)
    dk = torch.zeros(kh.shape, dtype=lay.acc, device=lay.device)
    dv = torch.zeros(vh.shape, dtype=lay.acc, device=lay.device)
    dcq = torch.zeros_like(cq) if want_c else None
    dck = torch.zeros_like(ck) if want_c else None
    for t0, t1, kblocks in _tiles(lay, q):
        bt = t1 - t0
        qb = qg[:, :, t0:t1].to(lay.acc)
        dob = dog[:, :, t0:t1].to(lay.acc).flatten(2, 3)  # [B, Hkv, bt·G, D]
        for s0, s1 in kblocks:
            kb, vb = kh[:, :, s0:s1].to(lay.acc), vh[:, :, s0:s1].to(lay.acc)
            p = torch.exp(lay.scores(qb, kb, t0, t1, s0, s1, cq, ck) - lse_g[:, :, t0:t1, :, None])
            dp = (dob @ vb.transpose(-1, -2)).unflatten(2, (bt, lay.g))  # [B, Hkv, bt, G, bs]
            ds = p * (dp - delta[:, :, t0:t1, :, None])
            dv[:, :, s0:s1] += p.flatten(2, 3).transpose(-1, -2) @ dob
            dq[:, :, t0:t1] += ((ds.flatten(2, 3) @ kb) * lay.scale).unflatten(2, (bt, lay.g))
            dk[:, :, s0:s1] += (ds.flatten(2, 3).transpose(-1, -2) @ qb.flatten(2, 3)) * lay.scale
            if want_c:  # s_ij has + c_i − c_j: row sums go to c_i, column sums (negated) to c_j
                sinks = lay.sink_columns(s0, s1)
                ds_c = ds if sinks is None else ds.masked_fill(sinks, 0.0)  # sinks carry no c
                dcq[:, :, t0:t1] += ds_c.sum(-1)
                dck[:, :, :, s0:s1] -= ds_c.sum(2)
    dq = lay.q_heads_back(dq).to(q.dtype)
    dk, dv = dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)
    dc_q = lay.q_heads_back(dcq).to(c_q.dtype) if want_c else None
    dc_k = dck.permute(0, 3, 1, 2).flatten(2, 3).to(c_k.dtype) if want_c else None
    return dq, dk, dv, dc_q, dc_k


class _BlockedAttention(torch.autograd.Function):
    # Autocast is switched off inside: it would run the block matmuls in bf16, and the logits and
    # softmax statistics must stay in fp32.

    @staticmethod
    def forward(ctx, q, k, v, c_q, c_k, q_doc, k_doc, q_offset, causal, scale, window, sink, block_q, block_k,
                s2, s2_head, s2_n_heads):
        args = (q_offset, causal, scale, window, sink, q_doc, k_doc, block_q, block_k, s2, s2_head, s2_n_heads)
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _forward(_Layout(q, k, v, *args), q, k, v, c_q, c_k)
        # O(T) tensors only; probabilities are recomputed per block in backward. lse stays
        # differentiable: context parallelism merges partial results through it.
        ctx.save_for_backward(q, k, v, out, lse, c_q, c_k, q_doc, k_doc)
        ctx.args = (q_offset, causal, scale, window, sink, block_q, block_k, s2, s2_head, s2_n_heads)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, c_q, c_k, q_doc, k_doc = ctx.saved_tensors
        q_offset, causal, scale, window, sink, block_q, block_k, s2, s2_head, s2_n_heads = ctx.args
        lay = _Layout(q, k, v, q_offset, causal, scale, window, sink, q_doc, k_doc, block_q, block_k,
                      s2, s2_head, s2_n_heads)
        want_c = c_q is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        with torch.autocast(q.device.type, enabled=False):
            grads = _backward(lay, q, k, v, out, lse, c_q, c_k, d_out, d_lse, want_c)
        return grads + (None,) * 12


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_offset: int,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    sink: int = 0,
    q_doc: Optional[torch.Tensor] = None,
    k_doc: Optional[torch.Tensor] = None,
    c_q: Optional[torch.Tensor] = None,
    c_k: Optional[torch.Tensor] = None,
    s2: Optional[S2Pattern] = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """General blocked attention: explicit query positions, separate query/key document ids and
    FoX cumulative gates, so that a context-parallel caller can attend local queries to a remote
    K/V chunk and merge the partial ``(o, lse)`` results.

    Args:
        q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (any float dtype, Hq a
            multiple of Hkv).
        q_offset: query ``i`` sits at key position ``q_offset + i`` (keys are at ``0..S-1``);
            may be negative or ≥ S.
        causal, window, sink: see ``visibility``; scale: default ``D ** -0.5``.
        q_doc: ``[B, T]`` and k_doc: ``[B, S]`` document ids (both or neither).
        c_q: ``[B, T, Hq]`` and c_k: ``[B, S, Hq]`` fp32 cumulative sums of log forget gates at the
            query/key positions (both or neither); logits get ``c_q[i] − c_k[j]`` except on sink keys
            (``j < sink``), which never fade. Differentiable.
        s2: S2 block pattern (``braid.kernels.s2``); head h of q is head ``s2.head_start + h`` of it.
        block_q, block_k: block sizes of the loops (torch backend).
        backend: ``"torch"`` (this file) or ``"triton"`` (``braid.kernels.triton.attention``).
    Returns:
        o ``[B, T, Hq, Dv]`` in q's dtype and lse ``[B, Hq, T]`` (fp32, fp64 for fp64 inputs), both
        differentiable. Rows with no visible key: o = 0, lse = −inf.
    """
    if (q_doc is None) != (k_doc is None) or (c_q is None) != (c_k is None):
        raise ValueError("partial_attention: give q_doc with k_doc and c_q with c_k")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "triton":
        from braid.kernels.triton.attention import triton_attention

        return triton_attention(q, k, v, q_offset=q_offset, causal=causal, scale=scale, window=window,
                                sink=sink, q_doc=q_doc, k_doc=k_doc, c_q=c_q, c_k=c_k, s2=s2)
    if backend != "torch":
        raise ValueError(f"partial_attention: backend={backend!r} is unknown (allowed: torch, triton)")
    if s2 is None:
        return _BlockedAttention.apply(q, k, v, c_q, c_k, q_doc, k_doc, q_offset, causal, scale, window,
                                       sink, block_q, block_k, None, 0, 1)
    return _s2_by_residue(q, k, v, c_q, c_k, q_doc, k_doc, q_offset, causal, scale, window, sink, s2,
                          block_q, block_k)


def _s2_by_residue(q, k, v, c_q, c_k, q_doc, k_doc, q_offset, causal, scale, window, sink, s2, block_q, block_k):
    """S2 on the torch path: one blocked call per class of heads sharing a residue, so that each call
    skips the blocks its heads do not see and the work scales with the pattern's density. The K/V
    heads of a class are gathered per query head (GQA repeat inside a class: simple, O(S·H·D))."""
    hq, g = q.shape[2], q.shape[2] // k.shape[2]
    residues = [int(s2.residue(h, hq)) for h in range(hq)]
    outs, lses, order = [], [], []
    for r in sorted(set(residues)):
        heads = [h for h in range(hq) if residues[h] == r]
        idx = torch.tensor(heads, device=q.device)
        kv = idx // g
        cq = None if c_q is None else c_q[:, :, idx]
        ck = None if c_k is None else c_k[:, :, idx]
        o, lse = _BlockedAttention.apply(q[:, :, idx], k[:, :, kv], v[:, :, kv], cq, ck, q_doc, k_doc, q_offset,
                                         causal, scale, window, sink, block_q, block_k, s2, heads[0], hq)
        outs.append(o)
        lses.append(lse)
        order += heads
    inverse = torch.argsort(torch.tensor(order, device=q.device))
    return torch.cat(outs, 2)[:, :, inverse], torch.cat(lses, 1)[:, inverse]


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    log_forget: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    sink: int = 0,
    doc_ids: Optional[torch.Tensor] = None,
    s2: Optional[S2Pattern] = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``braid.kernels.attention`` semantics (queries = the last T of S positions), always blocked.

    Returns ``(o [B,T,Hq,D] in q's dtype, lse [B,Hq,T] fp32)``. The FoX cumulative sum is taken here
    in fp32 (fp64 for fp64 gates), so autograd turns the row/column sums of dS into d log_forget by
    a reverse cumulative sum (for either backend).
    """
    t, s = q.shape[1], k.shape[1]
    c_q = c_k = q_doc = None
    if log_forget is not None:
        c_k = log_forget.to(torch.promote_types(log_forget.dtype, torch.float32)).cumsum(1)
        c_q = c_k[:, s - t:]
    if doc_ids is not None:
        q_doc = doc_ids[:, s - t:]
    return partial_attention(q, k, v, q_offset=s - t, causal=causal, scale=scale, window=window,
                             sink=sink, q_doc=q_doc, k_doc=doc_ids, c_q=c_q, c_k=c_k, s2=s2,
                             block_q=block_q, block_k=block_k, backend=backend)
