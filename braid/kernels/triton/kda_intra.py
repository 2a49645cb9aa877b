"""Triton kernels for KDA's intra-chunk WY/UT transform, forward and backward (fp32 throughout).

Per chunk of C tokens (one program each), with Γ the within-chunk cumulative log decay (computed by
torch, whose autograd turns dΓ into dg), q already scaled, and the document masks of
``braid.kernels.kda_chunk`` (``same`` pairs, ``carry`` rows that see the incoming state, ``last`` keys
that reach the outgoing state):

    A[i,j] = same·[j<i] β_i Σ_d k_id k_jd e^{Γ_id−Γ_jd}      P[i,j] = same·[j≤i] Σ_d q_id k_jd e^{Γ_id−Γ_jd}
    T = (I + A)⁻¹ (forward substitution)   w = T (β·carry·k·e^Γ)   u = T (β·v)
    q̃ = carry·q·e^Γ   k̃ = last·k·e^{Γ_last−Γ}   d = carry_last·e^{Γ_last}

Overflow: the pair scores work on BS×BS sub-blocks. Pairs in different sub-blocks factor through the
row block's first position r (e^{Γ_i−Γ_r}·e^{Γ_r−Γ_j}, both ≤ 1); pairs inside one sub-block form the
exponent difference explicitly (a [BS, BS, K] tile), masked before the exp. The backward uses the same
split for the transposed products. T is stored for the backward (C² floats per chunk, like P).

Import only when Triton should run (CUDA, or ``TRITON_INTERPRET=1`` set before the import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, rows, rk, K):
    return tl.load(ptr + rows[:, None] * K + rk[None, :], mask=rk[None, :] < K, other=0.0)


@triton.jit
def _kda_intra_scores(q_ptr, k_ptr, gam_ptr, beta_ptr, seg_ptr, a_ptr, p_ptr, K, HN, N,
                      C: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, HAS_DOC: tl.constexpr):
    pid = tl.program_id(0)  # chunk index in [B, H, N] order
    q_ptr += pid * C * K
    k_ptr += pid * C * K
    gam_ptr += pid * C * K
    if HAS_DOC:
        seg_ptr += (pid // HN * N + pid % N) * C  # seg is [B, N, C] (shared by heads)
    rs = tl.arange(0, BS)
    rk = tl.arange(0, BK)
    for I in tl.static_range(C // BS):
        ri = I * BS + rs
        qi, ki, gi = _load_rows(q_ptr, ri, rk, K), _load_rows(k_ptr, ri, rk, K), _load_rows(gam_ptr, ri, rk, K)
        ai = ki * tl.load(beta_ptr + pid * C + ri)[:, None]
        for J in tl.static_range(C // BS):
            rj = J * BS + rs
            a_t = tl.zeros([BS, BS], dtype=tl.float32)
            p_t = tl.zeros([BS, BS], dtype=tl.float32)
            if J < I:
                ref = tl.load(gam_ptr + I * BS * K + rk, mask=rk < K, other=0.0)
                er = tl.exp(gi - ref[None, :])
                kj = _load_rows(k_ptr, rj, rk, K) * tl.exp(ref[None, :] - _load_rows(gam_ptr, rj, rk, K))
                a_t = tl.dot(ai * er, tl.trans(kj))
                p_t = tl.dot(qi * er, tl.trans(kj))
            if J == I:
                low = ri[:, None] >= ri[None, :]
                e = tl.exp(tl.where(low[:, :, None], gi[:, None, :] - gi[None, :, :], float("-inf")))
                kk = ki[None, :, :] * e
                a_t = tl.where(ri[:, None] > ri[None, :], tl.sum(ai[:, None, :] * kk, axis=2), 0.0)
                p_t = tl.sum(qi[:, None, :] * kk, axis=2)
            if HAS_DOC:
                same = tl.load(seg_ptr + ri)[:, None] == tl.load(seg_ptr + rj)[None, :]
                a_t = tl.where(same, a_t, 0.0)
                p_t = tl.where(same, p_t, 0.0)
            tl.store(a_ptr + pid * C * C + ri[:, None] * C + rj[None, :], a_t)
            tl.store(p_ptr + pid * C * C + ri[:, None] * C + rj[None, :], p_t)


@triton.jit
def _doc_masks(seg_ptr, prev_ptr, pid, HN, N, rc, C: tl.constexpr, HAS_DOC: tl.constexpr):
    """carry [C], last [C] (as fp32 0/1) and carry_last (scalar fp32) of this chunk."""
    carry = tl.full([C], 1.0, tl.float32)
    last = tl.full([C], 1.0, tl.float32)
    carry_last = 1.0
    if HAS_DOC:
        chunk = pid // HN * N + pid % N
        seg = tl.load(seg_ptr + chunk * C + rc)
        prev = tl.load(prev_ptr + chunk)
        seg_last = tl.load(seg_ptr + chunk * C + C - 1)
        carry = (seg == prev).to(tl.float32)
        last = (seg == seg_last).to(tl.float32)
        carry_last = (seg_last == prev).to(tl.float32)
    return carry, last, carry_last


@triton.jit
def _chunk_offsets(pid, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Row offsets of chunk pid: rc [C], rk [BK], [C, C] pairs cc, [C, K] ck with mask km, [C, V] cv with vm."""
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    cc = pid * C * C + rc[:, None] * C + rc[None, :]
    ck = pid * C * K + rc[:, None] * K + rk[None, :]
    cv = pid * C * V + rc[:, None] * V + rv[None, :]
    return rc, rk, cc, ck, rk[None, :] < K, cv, rv[None, :] < V


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, gam_ptr, beta_ptr, pid, rc, ck, km, cv, vm, C: tl.constexpr):
    """q, k, Γ [C, K], v [C, V] and β [C] of chunk pid (zeros in the K/V padding)."""
    q = tl.load(q_ptr + ck, mask=km, other=0.0)
    k = tl.load(k_ptr + ck, mask=km, other=0.0)
    gam = tl.load(gam_ptr + ck, mask=km, other=0.0)
    v = tl.load(v_ptr + cv, mask=vm, other=0.0)
    beta = tl.load(beta_ptr + pid * C + rc)
    return q, k, gam, v, beta


@triton.jit
def _kda_intra_solve(q_ptr, k_ptr, v_ptr, gam_ptr, beta_ptr, seg_ptr, prev_ptr, a_ptr,
                     tinv_ptr, w_ptr, u_ptr, qin_ptr, kout_ptr, dec_ptr, K, V, HN, N,
                     C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DOC: tl.constexpr):
    pid = tl.program_id(0)
    rc, rk, cc, ck, km, cv, vm = _chunk_offsets(pid, K, V, C, BK, BV)
    A = tl.load(a_ptr + cc)
    # (I + A)⁻¹ row by row: T[i] = e_i − Σ_{j<i} A[i, j] T[j] (rows ≥ i of T are still identity rows,
    # and A[i, j ≥ i] = 0, so the full sum is the sum over j < i).
    eye = (rc[:, None] == rc[None, :]).to(tl.float32)
    tinv = eye
    for i in range(1, C):
        a_row = tl.sum(tl.where(rc[:, None] == i, A, 0.0), axis=0)
        new = tl.sum(a_row[:, None] * tinv, axis=0)
        tinv = tl.where(rc[:, None] == i, (rc == i).to(tl.float32)[None, :] - new[None, :], tinv)
    tl.store(tinv_ptr + cc, tinv)
    q, k, gam, v, beta = _load_chunk(q_ptr, k_ptr, v_ptr, gam_ptr, beta_ptr, pid, rc, ck, km, cv, vm, C)
    carry, last, carry_last = _doc_masks(seg_ptr, prev_ptr, pid, HN, N, rc, C, HAS_DOC)
    eg = tl.exp(gam)
    g_last = tl.load(gam_ptr + pid * C * K + (C - 1) * K + rk, mask=rk < K, other=0.0)
    tl.store(w_ptr + ck, tl.dot(tinv, k * eg * (beta * carry)[:, None]), mask=km)
    tl.store(u_ptr + cv, tl.dot(tinv, v * beta[:, None]), mask=vm)
    tl.store(qin_ptr + ck, q * eg * carry[:, None], mask=km)
    tl.store(kout_ptr + ck, k * tl.exp(g_last[None, :] - gam) * last[:, None], mask=km)
    tl.store(dec_ptr + pid * K + rk, tl.exp(g_last) * carry_last, mask=rk < K)


@triton.jit
def _kda_intra_bwd_local(q_ptr, k_ptr, v_ptr, gam_ptr, beta_ptr, seg_ptr, prev_ptr, tinv_ptr, w_ptr, u_ptr,
                         dw_ptr, du_ptr, dqin_ptr, dkout_ptr, ddec_ptr,
                         da_ptr, dq_ptr, dk_ptr, dv_ptr, dgam_ptr, dbeta_ptr, K, V, HN, N,
                         C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DOC: tl.constexpr):
    """Everything but the pair-score terms: the solve (dA), and the elementwise outputs."""
    pid = tl.program_id(0)
    rc, rk, cc, ck, km, cv, vm = _chunk_offsets(pid, K, V, C, BK, BV)
    tinv = tl.load(tinv_ptr + cc)
    w, dw = tl.load(w_ptr + ck, mask=km, other=0.0), tl.load(dw_ptr + ck, mask=km, other=0.0)
    u, du = tl.load(u_ptr + cv, mask=vm, other=0.0), tl.load(du_ptr + cv, mask=vm, other=0.0)
    # W = (I + A)⁻¹ X: dX = Tᵀ dW, dA = −dX Wᵀ (on the strictly lower, same-document pairs).
    dxw = tl.dot(tl.trans(tinv), dw)
    dxu = tl.dot(tl.trans(tinv), du)
    dA = -(tl.dot(dxw, tl.trans(w)) + tl.dot(dxu, tl.trans(u)))
    keep = rc[:, None] > rc[None, :]
    if HAS_DOC:
        chunk = pid // HN * N + pid % N
        seg = tl.load(seg_ptr + chunk * C + rc)
        keep = keep & (seg[:, None] == seg[None, :])
    tl.store(da_ptr + cc, tl.where(keep, dA, 0.0))
    q, k, gam, v, beta = _load_chunk(q_ptr, k_ptr, v_ptr, gam_ptr, beta_ptr, pid, rc, ck, km, cv, vm, C)
    carry, last, carry_last = _doc_masks(seg_ptr, prev_ptr, pid, HN, N, rc, C, HAS_DOC)
    eg = tl.exp(gam)
    kexp = k * eg * carry[:, None]  # X_w = β · kexp
    tl.store(dv_ptr + cv, dxu * beta[:, None], mask=vm)
    tl.store(dbeta_ptr + pid * C + rc, tl.sum(dxw * kexp, axis=1) + tl.sum(dxu * v, axis=1))
    dk = dxw * beta[:, None] * eg * carry[:, None]
    dgam = dxw * beta[:, None] * kexp
    dqin = tl.load(dqin_ptr + ck, mask=km, other=0.0)
    qin = q * eg * carry[:, None]
    dq = dqin * eg * carry[:, None]
    dgam += dqin * qin
    g_last = tl.load(gam_ptr + pid * C * K + (C - 1) * K + rk, mask=rk < K, other=0.0)
    e_out = tl.exp(g_last[None, :] - gam) * last[:, None]
    dkout = tl.load(dkout_ptr + ck, mask=km, other=0.0)
    dk += dkout * e_out
    dgam -= dkout * k * e_out
    ddec = tl.load(ddec_ptr + pid * K + rk, mask=rk < K, other=0.0)
    extra = tl.sum(dkout * k * e_out, axis=0) + ddec * tl.exp(g_last) * carry_last  # ∂/∂Γ_last
    dgam += tl.where(rc[:, None] == C - 1, extra[None, :], 0.0)
    tl.store(dq_ptr + ck, dq, mask=km)
    tl.store(dk_ptr + ck, dk, mask=km)
    tl.store(dgam_ptr + ck, dgam, mask=km)


@triton.jit
def _kda_intra_bwd_pairs(q_ptr, k_ptr, gam_ptr, beta_ptr, seg_ptr, da_ptr, dp_ptr,
                         dq_ptr, dk_ptr, dgam_ptr, dbeta_ptr, K, HN, N,
                         C: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, HAS_DOC: tl.constexpr):
    """Adds the pair-score terms. For sub-block X: row side (a = βk of A, q of P) over key blocks
    J ≤ X, key side (b = k) over row blocks I ≥ X; each sub-block's rows are written once."""
    pid = tl.program_id(0)
    q_ptr += pid * C * K
    k_ptr += pid * C * K
    gam_ptr += pid * C * K
    if HAS_DOC:
        seg_ptr += (pid // HN * N + pid % N) * C
    rs = tl.arange(0, BS)
    rk = tl.arange(0, BK)
    for X in tl.static_range(C // BS):
        rx = X * BS + rs
        qx, kx, gx = _load_rows(q_ptr, rx, rk, K), _load_rows(k_ptr, rx, rk, K), _load_rows(gam_ptr, rx, rk, K)
        bx = tl.load(beta_ptr + pid * C + rx)
        ax = kx * bx[:, None]
        da_a = tl.zeros([BS, BK], dtype=tl.float32)  # ∂/∂(βk) of the rows X, through A
        da_p = tl.zeros([BS, BK], dtype=tl.float32)  # ∂/∂q of the rows X, through P
        db = tl.zeros([BS, BK], dtype=tl.float32)  # ∂/∂k of the keys X, through A and P
        for J in tl.static_range(C // BS):
            rj = J * BS + rs
            if J < X:  # X rows against earlier key block J, reference point = first row of X
                ref = tl.load(gam_ptr + X * BS * K + rk, mask=rk < K, other=0.0)
                kj = _load_rows(k_ptr, rj, rk, K) * tl.exp(ref[None, :] - _load_rows(gam_ptr, rj, rk, K))
                dA = tl.load(da_ptr + pid * C * C + rx[:, None] * C + rj[None, :])
                dP = tl.load(dp_ptr + pid * C * C + rx[:, None] * C + rj[None, :])
                if HAS_DOC:
                    dP = tl.where(tl.load(seg_ptr + rx)[:, None] == tl.load(seg_ptr + rj)[None, :], dP, 0.0)
                er = tl.exp(gx - ref[None, :])
                da_a += tl.dot(dA, kj) * er
                da_p += tl.dot(dP, kj) * er
            if J == X:
                low = rx[:, None] >= rx[None, :]
                e = tl.exp(tl.where(low[:, :, None], gx[:, None, :] - gx[None, :, :], float("-inf")))
                dA = tl.load(da_ptr + pid * C * C + rx[:, None] * C + rx[None, :])
                dP = tl.where(low, tl.load(dp_ptr + pid * C * C + rx[:, None] * C + rx[None, :]), 0.0)
                if HAS_DOC:
                    dP = tl.where(tl.load(seg_ptr + rx)[:, None] == tl.load(seg_ptr + rx)[None, :], dP, 0.0)
                da_a += tl.sum(dA[:, :, None] * kx[None, :, :] * e, axis=1)
                da_p += tl.sum(dP[:, :, None] * kx[None, :, :] * e, axis=1)
                db += tl.sum((dA[:, :, None] * ax[:, None, :] + dP[:, :, None] * qx[:, None, :]) * e, axis=0)
            if J > X:  # later row block J against keys X, reference point = first row of J
                ref = tl.load(gam_ptr + J * BS * K + rk, mask=rk < K, other=0.0)
                gj = _load_rows(gam_ptr, rj, rk, K)
                er = tl.exp(gj - ref[None, :])
                aj = _load_rows(k_ptr, rj, rk, K) * tl.load(beta_ptr + pid * C + rj)[:, None] * er
                qj = _load_rows(q_ptr, rj, rk, K) * er
                dA = tl.load(da_ptr + pid * C * C + rj[:, None] * C + rx[None, :])
                dP = tl.load(dp_ptr + pid * C * C + rj[:, None] * C + rx[None, :])
                if HAS_DOC:
                    dP = tl.where(tl.load(seg_ptr + rj)[:, None] == tl.load(seg_ptr + rx)[None, :], dP, 0.0)
                db += (tl.dot(tl.trans(dA), aj) + tl.dot(tl.trans(dP), qj)) * tl.exp(ref[None, :] - gx)
        offs = pid * C * K + rx[:, None] * K + rk[None, :]
        km = rk[None, :] < K
        tl.store(dq_ptr + offs, tl.load(dq_ptr + offs, mask=km, other=0.0) + da_p, mask=km)
        tl.store(dk_ptr + offs, tl.load(dk_ptr + offs, mask=km, other=0.0) + bx[:, None] * da_a + db, mask=km)
        tl.store(dgam_ptr + offs, tl.load(dgam_ptr + offs, mask=km, other=0.0) + ax * da_a + qx * da_p - kx * db,
                 mask=km)
        tl.store(dbeta_ptr + pid * C + rx, tl.load(dbeta_ptr + pid * C + rx) + tl.sum(kx * da_a, axis=1))


SUB = 16  # sub-block size of the pair scores (tl.dot needs ≥ 16)


def _sizes(k: int, v: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(k)), max(16, triton.next_power_of_2(v))


def compile_for_gpu(k: int = 128, v: int = 128, c: int = 64, capability: int = 90) -> dict[str, dict]:
    """The four kernels compiled ahead of time with their launch sizes (see ``triton.aot``), documents
    on; needs a process without ``TRITON_INTERPRET=1``."""
    from braid.kernels.triton.aot import compile_stats

    bk, bv = _sizes(k, v)
    consts = dict(C=c, BS=SUB, BK=bk, BV=bv, HAS_DOC=True)

    def arg_type(name: str) -> str:
        return "*i32" if name in ("seg_ptr", "prev_ptr") else "*fp32" if name.endswith("_ptr") else "i32"

    return {fn.__name__: compile_stats(fn, consts, arg_type, {}, capability)
            for fn in (_kda_intra_scores, _kda_intra_solve, _kda_intra_bwd_local, _kda_intra_bwd_pairs)}


class _KDAIntra(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gam, beta, seg, prev):
        b, h, n, c, dk = k.shape
        dv = v.shape[-1]
        bk, bv = _sizes(dk, dv)
        f32 = dict(dtype=torch.float32, device=k.device)
        q, k, v, gam, beta = (x.float().contiguous() for x in (q, k, v, gam, beta))
        a = torch.empty(b, h, n, c, c, **f32)
        p, tinv = torch.empty(b, h, n, c, c, **f32), torch.empty(b, h, n, c, c, **f32)
        w, q_in, k_out = (torch.empty(b, h, n, c, dk, **f32) for _ in range(3))
        u = torch.empty(b, h, n, c, dv, **f32)
        dec = torch.empty(b, h, n, dk, **f32)
        has_doc = seg is not None
        grid = (b * h * n,)
        _kda_intra_scores[grid](q, k, gam, beta, seg, a, p, dk, h * n, n, C=c, BS=SUB, BK=bk, HAS_DOC=has_doc)
        _kda_intra_solve[grid](q, k, v, gam, beta, seg, prev, a, tinv, w, u, q_in, k_out, dec, dk, dv, h * n, n,
                               C=c, BK=bk, BV=bv, HAS_DOC=has_doc)
        ctx.save_for_backward(q, k, v, gam, beta, seg, prev, tinv, w, u)
        return w, u, p, q_in, k_out, dec

    @staticmethod
    def backward(ctx, dw, du, dp, dq_in, dk_out, ddec):
        q, k, v, gam, beta, seg, prev, tinv, w, u = ctx.saved_tensors
        b, h, n, c, dk = k.shape
        dv = v.shape[-1]
        bk, bv = _sizes(dk, dv)
        f32 = dict(dtype=torch.float32, device=k.device)

        def grad(x, shape):  # an output nobody used has no gradient: zeros keep the kernels simple
            return torch.zeros(shape, **f32) if x is None else x.float().contiguous()

        dw, dq_in, dk_out = (grad(x, k.shape) for x in (dw, dq_in, dk_out))
        du, dp, ddec = grad(du, v.shape), grad(dp, tinv.shape), grad(ddec, (b, h, n, dk))
        da = torch.empty(b, h, n, c, c, **f32)
        dq, dk_, dgam = (torch.empty(b, h, n, c, dk, **f32) for _ in range(3))
        dv_ = torch.empty(b, h, n, c, dv, **f32)
        dbeta = torch.empty(b, h, n, c, **f32)
        has_doc = seg is not None
        grid = (b * h * n,)
        _kda_intra_bwd_local[grid](q, k, v, gam, beta, seg, prev, tinv, w, u, dw, du, dq_in, dk_out, ddec,
                                   da, dq, dk_, dv_, dgam, dbeta, dk, dv, h * n, n,
                                   C=c, BK=bk, BV=bv, HAS_DOC=has_doc)
        _kda_intra_bwd_pairs[grid](q, k, gam, beta, seg, da, dp, dq, dk_, dgam, dbeta, dk, h * n, n,
                                   C=c, BS=SUB, BK=bk, HAS_DOC=has_doc)
        return dq, dk_, dv_, dgam, dbeta, None, None


def kda_intra(q, k, v, gam, beta, seg=None, prev=None):
    """Intra-chunk WY/UT transform of chunked KDA as one differentiable Triton op.

    Args:
        q (already scaled), k, gam (within-chunk cumsum of g): ``[B, H, N, C, K]``; v: ``[B, H, N, C, V]``;
        beta: ``[B, H, N, C]``; seg: ``[B, N, C]`` int32 segment index (non-decreasing per row) or None;
        prev: ``[B, N]`` int32 segment of the token before each chunk (chunk 0: its own first), or None.
        C must be a multiple of 16 (power of two).
    Returns:
        ``w [B,H,N,C,K], u [B,H,N,C,V], P [B,H,N,C,C], q̃ [B,H,N,C,K], k̃ [B,H,N,C,K], decay [B,H,N,K]``, fp32.
    """
    return _KDAIntra.apply(q, k, v, gam, beta, seg, prev)
