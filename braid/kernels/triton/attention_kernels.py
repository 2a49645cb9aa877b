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
def _attn_fwd(Q, K, V, O, LSE, CQ, CK, QD, KD,
              s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_ot, s_oh,
              T, S, HQ, G, q_offset, scale_log2, window, sink,
              s2_block, s2_local, s2_stride, s2_step, s2_shift,
              D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_DOC: tl.constexpr, HAS_S2: tl.constexpr, HAS_C: tl.constexpr, PREC: tl.constexpr):
    """One program per (query tile, batch·query head): o [B,T,Hq,DV] and lse [B,Hq,T] (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    kvh = h // G
    res = (h * s2_step + s2_shift) % s2_stride
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n0 = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q_ok = offs_m < T
    qp = q_offset + offs_m
    q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qt + h * s_qh + offs_d[None, :],
                mask=q_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    qd = tl.zeros([BM], dtype=tl.int64)
    qd_lo = 0
    qd_hi = 0
    if HAS_DOC:
        qd = tl.load(QD + b * T + offs_m, mask=q_ok, other=0)
        qd_lo = tl.min(tl.where(q_ok, qd, 2 ** 62), 0)
        qd_hi = tl.max(tl.where(q_ok, qd, -2 ** 62), 0)
    cq = tl.zeros([BM], dtype=tl.float32)
    if HAS_C:
        cq = tl.load(CQ + (b * T + offs_m) * HQ + h, mask=q_ok, other=0.0)
    q_lo = q_offset + pid_m * BM
    q_hi = q_offset + tl.minimum(pid_m * BM + BM, T) - 1
    sink_end, lo, hi = _key_range(q_lo, q_hi, S, window, sink, BN, CAUSAL, HAS_WINDOW)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for loop in tl.static_range(2):  # sink tiles [0, sink_end), then the causal/window range [lo, hi)
        for start_n in range(lo * loop, sink_end + (hi - sink_end) * loop, BN):
            offs_n = start_n + offs_n0
            k_ok = offs_n < S
            kd = tl.zeros([BN], dtype=tl.int64)
            kd_lo = 0
            kd_hi = 0
            if HAS_DOC:
                kd = tl.load(KD + b * S + offs_n, mask=k_ok, other=-1)
                kd_lo = tl.min(tl.where(k_ok, kd, 2 ** 62), 0)
                kd_hi = tl.max(tl.where(k_ok, kd, -2 ** 62), 0)
            k_hi = tl.minimum(start_n + BN, S) - 1
            if _tile_live(q_lo, q_hi, start_n, k_hi, qd_lo, qd_hi, kd_lo, kd_hi, res, window, sink,
                          s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2):
                k_t = tl.load(K + b * s_kb + offs_n[None, :] * s_ks + kvh * s_kh + offs_d[:, None],
                              mask=k_ok[None, :] & (offs_d[:, None] < D), other=0.0)
                ck = tl.zeros([BN], dtype=tl.float32)
                if HAS_C:
                    ck = tl.load(CK + (b * S + offs_n) * HQ + h, mask=k_ok, other=0.0)
                s = _scores(q, k_t, qp[:, None], offs_n[None, :], q_ok[:, None], k_ok[None, :],
                            qd[:, None], kd[None, :], cq[:, None], ck[None, :], res, scale_log2, window, sink,
                            s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2, HAS_C, PREC)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # Rows with nothing visible yet keep m = −inf: shift them by 0 so exp2 gives 0, not NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(s - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + b * s_vb + offs_n[:, None] * s_vs + kvh * s_vh + offs_dv[None, :],
                            mask=k_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
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
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m0 = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    k_ok = offs_n < S
    k = tl.load(K + b * s_kb + offs_n[:, None] * s_ks + kvh * s_kh + offs_d[None, :],
                mask=k_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * s_vb + offs_n[:, None] * s_vs + kvh * s_vh + offs_dv[None, :],
                mask=k_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    k_lo = pid_n * BN
    k_hi = tl.minimum(k_lo + BN, S) - 1
    kd = tl.zeros([BN], dtype=tl.int64)
    kd_lo = 0
    kd_hi = 0
    if HAS_DOC:
        kd = tl.load(KD + b * S + offs_n, mask=k_ok, other=-1)
        kd_lo = tl.min(tl.where(k_ok, kd, 2 ** 62), 0)
        kd_hi = tl.max(tl.where(k_ok, kd, -2 ** 62), 0)
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
        res = (h * s2_step + s2_shift) % s2_stride
        ck = tl.zeros([BN], dtype=tl.float32)
        if HAS_C:
            ck = tl.load(CK + (b * S + offs_n) * HQ + h, mask=k_ok, other=0.0)
        dck = tl.zeros([BN], dtype=tl.float32)
        for start_m in range(m_lo, m_hi, BM):
            offs_m = start_m + offs_m0
            q_ok = offs_m < T
            qd = tl.zeros([BM], dtype=tl.int64)
            qd_lo = 0
            qd_hi = 0
            if HAS_DOC:
                qd = tl.load(QD + b * T + offs_m, mask=q_ok, other=0)
                qd_lo = tl.min(tl.where(q_ok, qd, 2 ** 62), 0)
                qd_hi = tl.max(tl.where(q_ok, qd, -2 ** 62), 0)
            q_lo = q_offset + start_m
            q_hi = q_offset + tl.minimum(start_m + BM, T) - 1
            if _tile_live(q_lo, q_hi, k_lo, k_hi, qd_lo, qd_hi, kd_lo, kd_hi, res, window, sink,
                          s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2):
                q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qt + h * s_qh + offs_d[None, :],
                            mask=q_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                do = tl.load(DO + b * s_ob + offs_m[:, None] * s_ot + h * s_oh + offs_dv[None, :],
                             mask=q_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                cq = tl.zeros([BM], dtype=tl.float32)
                if HAS_C:
                    cq = tl.load(CQ + (b * T + offs_m) * HQ + h, mask=q_ok, other=0.0)
                # lse of fully masked rows is +inf here (set by the launcher): exp2(s − inf) = 0.
                lse = tl.load(LSE + (b * HQ + h) * T + offs_m, mask=q_ok, other=float("inf"))
                delta = tl.load(DELTA + (b * HQ + h) * T + offs_m, mask=q_ok, other=0.0)
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
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    kvh = h // G
    res = (h * s2_step + s2_shift) % s2_stride
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n0 = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q_ok = offs_m < T
    q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qt + h * s_qh + offs_d[None, :],
                mask=q_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * s_ob + offs_m[:, None] * s_ot + h * s_oh + offs_dv[None, :],
                 mask=q_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + (b * HQ + h) * T + offs_m, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * HQ + h) * T + offs_m, mask=q_ok, other=0.0)
    qd = tl.zeros([BM], dtype=tl.int64)
    qd_lo = 0
    qd_hi = 0
    if HAS_DOC:
        qd = tl.load(QD + b * T + offs_m, mask=q_ok, other=0)
        qd_lo = tl.min(tl.where(q_ok, qd, 2 ** 62), 0)
        qd_hi = tl.max(tl.where(q_ok, qd, -2 ** 62), 0)
    cq = tl.zeros([BM], dtype=tl.float32)
    if HAS_C:
        cq = tl.load(CQ + (b * T + offs_m) * HQ + h, mask=q_ok, other=0.0)
    q_lo = q_offset + pid_m * BM
    q_hi = q_offset + tl.minimum(pid_m * BM + BM, T) - 1
    sink_end, lo, hi = _key_range(q_lo, q_hi, S, window, sink, BN, CAUSAL, HAS_WINDOW)
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    dcq = tl.zeros([BM], dtype=tl.float32)
    for loop in tl.static_range(2):  # sink tiles [0, sink_end), then the causal/window range [lo, hi)
        for start_n in range(lo * loop, sink_end + (hi - sink_end) * loop, BN):
            offs_n = start_n + offs_n0
            k_ok = offs_n < S
            kd = tl.zeros([BN], dtype=tl.int64)
            kd_lo = 0
            kd_hi = 0
            if HAS_DOC:
                kd = tl.load(KD + b * S + offs_n, mask=k_ok, other=-1)
                kd_lo = tl.min(tl.where(k_ok, kd, 2 ** 62), 0)
                kd_hi = tl.max(tl.where(k_ok, kd, -2 ** 62), 0)
            k_hi = tl.minimum(start_n + BN, S) - 1
            if _tile_live(q_lo, q_hi, start_n, k_hi, qd_lo, qd_hi, kd_lo, kd_hi, res, window, sink,
                          s2_block, s2_local, s2_stride, CAUSAL, HAS_WINDOW, HAS_DOC, HAS_S2):
                k = tl.load(K + b * s_kb + offs_n[:, None] * s_ks + kvh * s_kh + offs_d[None, :],
                            mask=k_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                v = tl.load(V + b * s_vb + offs_n[:, None] * s_vs + kvh * s_vh + offs_dv[None, :],
                            mask=k_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                ck = tl.zeros([BN], dtype=tl.float32)
                if HAS_C:
                    ck = tl.load(CK + (b * S + offs_n) * HQ + h, mask=k_ok, other=0.0)
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
