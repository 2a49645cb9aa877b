"""Triton kernels of the attention family (FlashAttention-2 style): forward, dK/dV, dQ.

Semantics are those of ``braid.kernels.attention_blocked.partial_attention`` (read its docstring and
``visibility`` first): query i sits at position ``q_offset + i``, keys at ``0..S-1``; visibility =
causal_ok ∧ (sink ∨ (in_window ∧ same_doc ∧ s2_ok)); FoX logits get ``c_q[i] − c_k[j]`` off sinks.

Numerics: scores, softmax statistics and accumulators in fp32; the softmax runs in base 2 (``exp2``,
logits pre-multiplied by log2 e) and lse is returned in natural log. GQA: query head ``h`` reads kv
head ``h // G`` (K/V never repeated); the dK/dV program of a kv head loops over its G query heads, so
no atomics are needed. Tiles that no (query, key) pair of can see are skipped by a scalar test
(``_tile_live``): causal and window bounds shrink the loop ranges, S2 and document ranges skip inside.

On CPU tensors these run in Triton's interpreter (see ``braid.kernels.triton``).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _floor_div(x, b):
    # Triton's // truncates toward zero; positions can be negative (q_offset < 0).
    return (x - ((x % b) + b) % b) // b


@triton.jit
def _tile_live(q_lo, q_hi, k_lo, k_hi, qd_lo, qd_hi, kd_lo, kd_hi, res, window, sink,
               s2_block, s2_local, s2_stride,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_S2: tl.constexpr):
    """Scalar: may any pair of positions [q_lo, q_hi] × [k_lo, k_hi] be visible?"""
    live = k_lo >= 0  # a true scalar
    if HAS_WINDOW:
        live = live & (q_lo - k_hi < window)
        if not CAUSAL:
            live = live & (k_lo - q_hi < window)
    if HAS_DOC:
        live = live & (kd_hi >= qd_lo) & (kd_lo <= qd_hi)
    if HAS_S2:
        qi0 = _floor_div(q_lo, s2_block)
        qi1 = _floor_div(q_hi, s2_block)
        kj0 = k_lo // s2_block
        kj1 = k_hi // s2_block
        if CAUSAL:
            kj1 = tl.minimum(kj1, qi1)
            local = kj1 > qi0 - s2_local
        else:
            local = (kj0 < qi1 + s2_local) & (kj1 > qi0 - s2_local)
        first_vertical = kj0 + (s2_stride - (kj0 + res) % s2_stride) % s2_stride
        live = live & (kj0 <= kj1) & (local | (first_vertical <= kj1))
    live = live | (k_lo < sink)
    if CAUSAL:
        live = live & (k_lo <= q_hi)
    return live


@triton.jit
def _visible(qp, kp, qd, kd, res, window, sink, s2_block, s2_local, s2_stride,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, HAS_S2: tl.constexpr):
    """Bool [BM, BN] from query positions qp [BM, 1] and key positions kp [1, BN] (docs alike)."""
    ok = (qp - kp) == (qp - kp)  # all true, full tile shape
    if HAS_WINDOW:
        ok = ok & (qp - kp < window)
        if not CAUSAL:
            ok = ok & (kp - qp < window)
    if HAS_DOC:
        ok = ok & (qd == kd)
    if HAS_S2:
        qb = _floor_div(qp, s2_block)
        kb = kp // s2_block
        if CAUSAL:
            near = qb - kb < s2_local
        else:
            near = (qb - kb < s2_local) & (kb - qb < s2_local)
        ok = ok & (near | ((kb + res) % s2_stride == 0))
    ok = ok | (kp < sink)
    if CAUSAL:
        ok = ok & (kp <= qp)
    return ok


@triton.jit
def _scores(q, k_t, qp, kp, q_ok, k_ok, qd, kd, cq, ck, res, scale_log2, window, sink,
            s2_block, s2_local, s2_stride, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
            HAS_DOC: tl.constexpr, HAS_S2: tl.constexpr, HAS_C: tl.constexpr, PREC: tl.constexpr):
    """Masked base-2 logits [BM, BN] (−inf where invisible) of q [BM, BD] against k_t [BD, BN]."""
    s = tl.dot(q, k_t, input_precision=PREC) * scale_log2
    if HAS_C:  # FoX: + c_i − c_j, not on sinks (they never fade)
        bias = tl.where(kp < sink, 0.0, cq - ck)
        s = s + bias * 1.4426950408889634
    vis = _visible(qp, kp, qd, kd, res, window, sink, s2_block, s2_local, s2_stride,
                   CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2)
    return tl.where(vis & q_ok & k_ok, s, float("-inf"))


@triton.jit
def _key_range(q_lo, q_hi, S, window, sink, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(sink_end, lo, hi): key tiles to visit are [0, sink_end) ∪ [lo, hi), lo a multiple of BN."""
    hi = S
    lo = 0
    if CAUSAL:
        hi = tl.minimum(hi, q_hi + 1)
    if HAS_WINDOW:
        lo = tl.maximum(q_lo - window + 1, 0) // BN * BN
        if not CAUSAL:
            hi = tl.minimum(hi, q_hi + window)
    hi = tl.maximum(hi, 0)
    lo = tl.minimum(lo, hi)
    sink_end = tl.minimum(tl.minimum((sink + BN - 1) // BN * BN, lo), hi)
    return sink_end, lo, hi


@triton.jit
def _s2_residue(h, s2_step, s2_shift, s2_stride):
    # S2Pattern.residue(h): the launcher (``_Args``) folds head_start and offset into s2_shift.
    return (h * s2_step + s2_shift) % s2_stride


@triton.jit
def _query_head(HQ, G, s2_step, s2_shift, s2_stride):
    """(batch, query head, kv head, S2 residue) of a program over (query tile, batch·query head)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    return b, h, h // G, _s2_residue(h, s2_step, s2_shift, s2_stride)


@triton.jit
def _tile(DOC, b, L, start, offs0, pos0, doc_other, BLOCK: tl.constexpr, HAS_DOC: tl.constexpr):
    """Rows [start, start + BLOCK) of a length-L sequence whose row i sits at position pos0 + i:
    (offsets, in range, doc ids, min and max doc id in range, first and last position in range).
    offs0 = tl.arange(0, BLOCK), made by the caller outside its loops (it is not hoisted otherwise)."""
    offs = start + offs0
    ok = offs < L
    doc = tl.zeros([BLOCK], dtype=tl.int64)
    doc_lo = 0
    doc_hi = 0
    if HAS_DOC:
        doc = tl.load(DOC + b * L + offs, mask=ok, other=doc_other)
        doc_lo = tl.min(tl.where(ok, doc, 2 ** 62), 0)
        doc_hi = tl.max(tl.where(ok, doc, -2 ** 62), 0)
    return offs, ok, doc, doc_lo, doc_hi, pos0 + start, pos0 + tl.minimum(start + BLOCK, L) - 1


@triton.jit
def _gate(C_, b, L, offs, ok, HQ, h, BLOCK: tl.constexpr, HAS_C: tl.constexpr):
    """FoX cumulative gates [BLOCK] of head h at rows offs of c [B, L, Hq] (zeros without FoX)."""
    c = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_C:
        c = tl.load(C_ + (b * L + offs) * HQ + h, mask=ok, other=0.0)
    return c


@triton.jit
def _load_tile(ptr, rows, s_row, col0, cols, row_ok, n_cols):
    """[rows, cols] tile at ``ptr + row·s_row + col0 + col``, zeros outside the rows and n_cols."""
    return tl.load(ptr + rows[:, None] * s_row + col0 + cols[None, :],
                   mask=row_ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _lse_delta(LSE, DELTA, b, HQ, h, T, offs_m, q_ok):
    # lse of fully masked rows is +inf here (set by the launcher): exp2(s − inf) = 0.
    lse = tl.load(LSE + (b * HQ + h) * T + offs_m, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * HQ + h) * T + offs_m, mask=q_ok, other=0.0)
    return lse, delta


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CQ, CK, QD, KD,
              s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_ot, s_oh,
              T, S, HQ, G, q_offset, scale_log2, window, sink,
              s2_block, s2_local, s2_stride, s2_step, s2_shift,
              D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_DOC: tl.constexpr, HAS_S2: tl.constexpr, HAS_C: tl.constexpr, PREC: tl.constexpr):
    """One program per (query tile, batch·query head): o [B,T,Hq,DV] and lse [B,Hq,T] (fp32)."""
    pid_m = tl.program_id(0)
    b, h, kvh, res = _query_head(HQ, G, s2_step, s2_shift, s2_stride)
    offs_n0 = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    offs_m, q_ok, qd, qd_lo, qd_hi, q_lo, q_hi = _tile(QD, b, T, pid_m * BM, tl.arange(0, BM), q_offset, 0, BM,
                                                       HAS_DOC)
    qp = q_offset + offs_m
    q = _load_tile(Q + b * s_qb, offs_m, s_qt, h * s_qh, offs_d, q_ok, D)
    cq = _gate(CQ, b, T, offs_m, q_ok, HQ, h, BM, HAS_C)
    sink_end, lo, hi = _key_range(q_lo, q_hi, S, window, sink, BN, CAUSAL, HAS_WINDOW)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for loop in tl.static_range(2):  # sink tiles [0, sink_end), then the causal/window range [lo, hi)
        for start_n in range(lo * loop, sink_end + (hi - sink_end) * loop, BN):
            offs_n, k_ok, kd, kd_lo, kd_hi, k_lo, k_hi = _tile(KD, b, S, start_n, offs_n0, 0, -1, BN, HAS_DOC)
            if _tile_live(q_lo, q_hi, k_lo, k_hi, qd_lo, qd_hi, kd_lo, kd_hi, res, window, sink,
                          s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2):
                k_t = tl.load(K + b * s_kb + offs_n[None, :] * s_ks + kvh * s_kh + offs_d[:, None],
                              mask=k_ok[None, :] & (offs_d[:, None] < D), other=0.0)
                ck = _gate(CK, b, S, offs_n, k_ok, HQ, h, BN, HAS_C)
                s = _scores(q, k_t, qp[:, None], offs_n[None, :], q_ok[:, None], k_ok[None, :],
                            qd[:, None], kd[None, :], cq[:, None], ck[None, :], res, scale_log2, window, sink,
                            s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2, HAS_C, PREC)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # Rows with nothing visible yet keep m = −inf: shift them by 0 so exp2 gives 0, not NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(s - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = _load_tile(V + b * s_vb, offs_n, s_vs, kvh * s_vh, offs_dv, k_ok, DV)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
                m_i = m_new
    seen = l_i > 0.0  # fully masked rows: o = 0, lse = −inf
    l_safe = tl.where(seen, l_i, 1.0)
    o = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * s_ob + offs_m[:, None] * s_ot + h * s_oh + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=q_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + (b * HQ + h) * T + offs_m, lse, mask=q_ok)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, CQ, CK, QD, KD, DK, DV_, DCK,
                   s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_ot, s_oh,
                   s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh,
                   T, S, HQ, G, q_offset, scale, scale_log2, window, sink,
                   s2_block, s2_local, s2_stride, s2_step, s2_shift,
                   D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_DOC: tl.constexpr, HAS_S2: tl.constexpr, HAS_C: tl.constexpr, PREC: tl.constexpr):
    """One program per (key tile, batch·kv head), looping over the G query heads and the query tiles
    that can see the tile: dK, dV (kv dtype) and dc_k [B,S,Hq] = −column sums of dS (fp32)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    hkv = HQ // G
    b = (pid_bh // hkv).to(tl.int64)
    kvh = pid_bh % hkv
    offs_m0 = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    offs_n, k_ok, kd, kd_lo, kd_hi, k_lo, k_hi = _tile(KD, b, S, pid_n * BN, tl.arange(0, BN), 0, -1, BN, HAS_DOC)
    k = _load_tile(K + b * s_kb, offs_n, s_ks, kvh * s_kh, offs_d, k_ok, D)
    v = _load_tile(V + b * s_vb, offs_n, s_vs, kvh * s_vh, offs_dv, k_ok, DV)
    # Query tiles that can see this key tile: [m_lo, m_hi) in query indices.
    m_lo = T * 0  # tensors, not Python ints: the runtime `if` below must yield the same types
    m_hi = T + 0
    if CAUSAL:
        m_lo = tl.maximum(k_lo - q_offset, 0) // BM * BM
    if HAS_WINDOW:
        if k_lo >= sink:  # a tile with sink keys is seen by every (later) query
            m_hi = tl.maximum(tl.minimum(T, k_hi + window - q_offset), 0)
            if not CAUSAL:
                m_lo = tl.maximum(k_lo - window + 1 - q_offset, 0) // BM * BM
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BDV], dtype=tl.float32)
    for g in range(0, G):
        h = kvh * G + g
        res = _s2_residue(h, s2_step, s2_shift, s2_stride)
        ck = _gate(CK, b, S, offs_n, k_ok, HQ, h, BN, HAS_C)
        dck = tl.zeros([BN], dtype=tl.float32)
        for start_m in range(m_lo, m_hi, BM):
            offs_m, q_ok, qd, qd_lo, qd_hi, q_lo, q_hi = _tile(QD, b, T, start_m, offs_m0, q_offset, 0, BM, HAS_DOC)
            if _tile_live(q_lo, q_hi, k_lo, k_hi, qd_lo, qd_hi, kd_lo, kd_hi, res, window, sink,
                          s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2):
                q = _load_tile(Q + b * s_qb, offs_m, s_qt, h * s_qh, offs_d, q_ok, D)
                do = _load_tile(DO + b * s_ob, offs_m, s_ot, h * s_oh, offs_dv, q_ok, DV)
                cq = _gate(CQ, b, T, offs_m, q_ok, HQ, h, BM, HAS_C)
                lse, delta = _lse_delta(LSE, DELTA, b, HQ, h, T, offs_m, q_ok)
                s = _scores(q, tl.trans(k), (q_offset + offs_m)[:, None], offs_n[None, :], q_ok[:, None],
                            k_ok[None, :], qd[:, None], kd[None, :], cq[:, None], ck[None, :], res, scale_log2,
                            window, sink, s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2,
                            HAS_C, PREC)
                p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)  # [BM, BN]
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
                if HAS_C:  # s_ij has − c_j: column sums of dS (off sinks) go to c_j, negated
                    dck -= tl.sum(tl.where(offs_n[None, :] < sink, 0.0, ds), 0)
        if HAS_C:
            tl.store(DCK + (b * S + offs_n) * HQ + h, dck, mask=k_ok)
    tl.store(DK + b * s_dkb + offs_n[:, None] * s_dks + kvh * s_dkh + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=k_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + b * s_dvb + offs_n[:, None] * s_dvs + kvh * s_dvh + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=k_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, CQ, CK, QD, KD, DQ, DCQ,
                 s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_ot, s_oh,
                 s_dqb, s_dqt, s_dqh,
                 T, S, HQ, G, q_offset, scale, scale_log2, window, sink,
                 s2_block, s2_local, s2_stride, s2_step, s2_shift,
                 D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_DOC: tl.constexpr, HAS_S2: tl.constexpr, HAS_C: tl.constexpr, PREC: tl.constexpr):
    """One program per (query tile, batch·query head): dQ (q dtype) and dc_q [B,T,Hq] = row sums of dS."""
    pid_m = tl.program_id(0)
    b, h, kvh, res = _query_head(HQ, G, s2_step, s2_shift, s2_stride)
    offs_n0 = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    offs_m, q_ok, qd, qd_lo, qd_hi, q_lo, q_hi = _tile(QD, b, T, pid_m * BM, tl.arange(0, BM), q_offset, 0, BM,
                                                       HAS_DOC)
    q = _load_tile(Q + b * s_qb, offs_m, s_qt, h * s_qh, offs_d, q_ok, D)
    do = _load_tile(DO + b * s_ob, offs_m, s_ot, h * s_oh, offs_dv, q_ok, DV)
    lse, delta = _lse_delta(LSE, DELTA, b, HQ, h, T, offs_m, q_ok)
    cq = _gate(CQ, b, T, offs_m, q_ok, HQ, h, BM, HAS_C)
    sink_end, lo, hi = _key_range(q_lo, q_hi, S, window, sink, BN, CAUSAL, HAS_WINDOW)
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    dcq = tl.zeros([BM], dtype=tl.float32)
    for loop in tl.static_range(2):  # sink tiles [0, sink_end), then the causal/window range [lo, hi)
        for start_n in range(lo * loop, sink_end + (hi - sink_end) * loop, BN):
            offs_n, k_ok, kd, kd_lo, kd_hi, k_lo, k_hi = _tile(KD, b, S, start_n, offs_n0, 0, -1, BN, HAS_DOC)
            if _tile_live(q_lo, q_hi, k_lo, k_hi, qd_lo, qd_hi, kd_lo, kd_hi, res, window, sink,
                          s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2):
                k = _load_tile(K + b * s_kb, offs_n, s_ks, kvh * s_kh, offs_d, k_ok, D)
                v = _load_tile(V + b * s_vb, offs_n, s_vs, kvh * s_vh, offs_dv, k_ok, DV)
                ck = _gate(CK, b, S, offs_n, k_ok, HQ, h, BN, HAS_C)
                s = _scores(q, tl.trans(k), (q_offset + offs_m)[:, None], offs_n[None, :], q_ok[:, None],
                            k_ok[None, :], qd[:, None], kd[None, :], cq[:, None], ck[None, :], res, scale_log2,
                            window, sink, s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2,
                            HAS_C, PREC)
                p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
                if HAS_C:  # s_ij has + c_i: row sums of dS (off sinks) go to c_i
                    dcq += tl.sum(tl.where(offs_n[None, :] < sink, 0.0, ds), 1)
    tl.store(DQ + b * s_dqb + offs_m[:, None] * s_dqt + h * s_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & (offs_d[None, :] < D))
    if HAS_C:
        tl.store(DCQ + (b * T + offs_m) * HQ + h, dcq, mask=q_ok)
