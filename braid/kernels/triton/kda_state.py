"""Triton kernels for KDA's inter-chunk state recurrence, forward and backward.

Given the intra-chunk results of the WY/UT transform (``braid.kernels.kda_chunk``), per chunk n:

    v'_n = u_n − w_n S_n,   o_n = q̃_n S_n + P_n v'_n,   S_{n+1} = Diag(d_n) S_n + k̃_nᵀ v'_n

with ``w, q̃ (= q·e^Γ), k̃ (= k·e^{Γ_last − Γ}) : [C, K]``, ``u : [C, V]``, ``P : [C, C]`` (masked
decayed scores), ``d = e^{Γ_last} : [K]``, state ``S : [K, V]`` (fp32). One program owns a (batch,
head) pair and a block of ``BV`` value columns (the recurrence is independent per value column) and
walks the chunks in order, keeping S in registers. The forward stores S_n for every chunk
(``[B, H, N, K, V]`` fp32, one state per 64 tokens); the backward walks the chunks in reverse with the
adjoint ``dS_n = Diag(d_n) dS_{n+1} + q̃_nᵀ do_n − w_nᵀ dv'_n``, ``dv'_n = P_nᵀ do_n + k̃_n dS_{n+1}``,
recomputing v'_n from the stored S_n. Gradients that sum over value columns (w, q̃, k̃, P, d) are written
per value block and summed by torch.

Packed documents with a restart state S_r (``braid.kernels.kda_chunk._restart_terms``): a chunk in
which a document starts adds ``Diag(d_r,n) S_r`` to ``S_{n+1}``; the backward adds
``Diag(d_r,n) dS_{n+1}`` to dS_r and ``Σ_v S_r ⊙ dS_{n+1}`` to dd_r,n.

Import only when Triton should run (CUDA, or ``TRITON_INTERPRET=1`` set before the import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _offsets(vb, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets of value block vb: rk [BK] (mask km), rv [BV] (mask vm), the state's [K, V] kv (mask
    kvm) and a chunk's [C, K] ck, [C, V] cv and [C, C] cc."""
    rc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    km, vm = rk < K, rv < V
    kv = rk[:, None] * V + rv[None, :]
    kvm = km[:, None] & vm[None, :]
    ck = rc[:, None] * K + rk[None, :]
    cv = rc[:, None] * V + rv[None, :]
    cc = rc[:, None] * C + rc[None, :]
    return rk, km, vm, kv, kvm, ck, cv, cc


@triton.jit
def _load_chunk(w_ptr, qi_ptr, ko_ptr, u_ptr, p_ptr, dec_ptr, chunk, rk, km, vm, ck, cv, cc, K, V,
                C: tl.constexpr):
    """w, q̃, k̃ [C, K], u [C, V], P [C, C] and d [K] of one chunk (zeros in the K/V padding)."""
    w = tl.load(w_ptr + chunk * C * K + ck, mask=km[None, :], other=0.0)
    qi = tl.load(qi_ptr + chunk * C * K + ck, mask=km[None, :], other=0.0)
    ko = tl.load(ko_ptr + chunk * C * K + ck, mask=km[None, :], other=0.0)
    u = tl.load(u_ptr + chunk * C * V + cv, mask=vm[None, :], other=0.0)
    p = tl.load(p_ptr + chunk * C * C + cc)
    dec = tl.load(dec_ptr + chunk * K + rk, mask=km, other=0.0)
    return w, qi, ko, u, p, dec


@triton.jit
def _kda_state_fwd(w_ptr, qi_ptr, u_ptr, p_ptr, ko_ptr, dec_ptr, s0_ptr, dr_ptr, sr_ptr, o_ptr, states_ptr,
                   final_ptr, NC, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   HAS_RESTART: tl.constexpr):
    bh, vb = tl.program_id(0), tl.program_id(1)
    rk, km, vm, kv, kvm, ck, cv, cc = _offsets(vb, K, V, C, BK, BV)
    S = tl.load(s0_ptr + bh * K * V + kv, mask=kvm, other=0.0)
    if HAS_RESTART:
        Sr = tl.load(sr_ptr + bh * K * V + kv, mask=kvm, other=0.0)
    for i in range(NC):
        chunk = bh * NC + i
        tl.store(states_ptr + chunk * K * V + kv, S, mask=kvm)
        w, qi, ko, u, p, dec = _load_chunk(w_ptr, qi_ptr, ko_ptr, u_ptr, p_ptr, dec_ptr, chunk, rk, km, vm, ck, cv, cc,
                                           K, V, C)
        v_new = u - tl.dot(w, S)
        o = tl.dot(qi, S) + tl.dot(p, v_new)
        tl.store(o_ptr + chunk * C * V + cv, o, mask=vm[None, :])
        S = dec[:, None] * S + tl.dot(tl.trans(ko), v_new)
        if HAS_RESTART:
            S += tl.load(dr_ptr + chunk * K + rk, mask=km, other=0.0)[:, None] * Sr
    tl.store(final_ptr + bh * K * V + kv, S, mask=kvm)


@triton.jit
def _kda_state_bwd(w_ptr, qi_ptr, u_ptr, p_ptr, ko_ptr, dec_ptr, dr_ptr, sr_ptr, states_ptr, do_ptr, dfinal_ptr,
                   du_ptr, dw_ptr, dqi_ptr, dko_ptr, dp_ptr, ddec_ptr, ds0_ptr, ddr_ptr, dsr_ptr,
                   BH, NC, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   HAS_DFINAL: tl.constexpr, HAS_RESTART: tl.constexpr):
    bh, vb = tl.program_id(0), tl.program_id(1)
    rk, km, vm, kv, kvm, ck, cv, cc = _offsets(vb, K, V, C, BK, BV)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + bh * K * V + kv, mask=kvm, other=0.0)
    part = vb * BH * NC  # this value block's slice of the partial-sum buffers
    if HAS_RESTART:
        Sr = tl.load(sr_ptr + bh * K * V + kv, mask=kvm, other=0.0)
        dSr = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(NC):
        i = NC - 1 - j
        chunk = bh * NC + i
        S = tl.load(states_ptr + chunk * K * V + kv, mask=kvm, other=0.0)
        w, qi, ko, u, p, dec = _load_chunk(w_ptr, qi_ptr, ko_ptr, u_ptr, p_ptr, dec_ptr, chunk, rk, km, vm, ck, cv, cc,
                                           K, V, C)
        do = tl.load(do_ptr + chunk * C * V + cv, mask=vm[None, :], other=0.0)
        v_new = u - tl.dot(w, S)  # recomputed, not stored
        if HAS_RESTART:  # dS is still dS_{n+1} here
            dr = tl.load(dr_ptr + chunk * K + rk, mask=km, other=0.0)
            dSr += dr[:, None] * dS
            tl.store(ddr_ptr + (part + chunk) * K + rk, tl.sum(Sr * dS, axis=1), mask=km)
        dv_new = tl.dot(tl.trans(p), do) + tl.dot(ko, dS)
        tl.store(du_ptr + chunk * C * V + cv, dv_new, mask=vm[None, :])
        tl.store(dp_ptr + (part + chunk) * C * C + cc, tl.dot(do, tl.trans(v_new)))
        tl.store(dko_ptr + (part + chunk) * C * K + ck, tl.dot(v_new, tl.trans(dS)), mask=km[None, :])
        tl.store(ddec_ptr + (part + chunk) * K + rk, tl.sum(S * dS, axis=1), mask=km)
        tl.store(dw_ptr + (part + chunk) * C * K + ck, -tl.dot(dv_new, tl.trans(S)), mask=km[None, :])
        tl.store(dqi_ptr + (part + chunk) * C * K + ck, tl.dot(do, tl.trans(S)), mask=km[None, :])
        dS = dec[:, None] * dS + tl.dot(tl.trans(qi), do) - tl.dot(tl.trans(w), dv_new)
    tl.store(ds0_ptr + bh * K * V + kv, dS, mask=kvm)
    if HAS_RESTART:
        tl.store(dsr_ptr + bh * K * V + kv, dSr, mask=kvm)


def _blocks(k: int, v: int) -> tuple[int, int]:
    # tl.dot needs every dimension ≥ 16; K stays whole (the K-sums of the gradients), V is split.
    return max(16, triton.next_power_of_2(k)), max(16, min(64, triton.next_power_of_2(v)))


def _bwd_blocks(k: int, v: int) -> tuple[int, int]:
    # The backward holds more [K, BV] tiles than the forward: at K = 128, C = 64 and BV = 64 Triton 3.6
    # gives it 272 KiB of shared memory (over sm_90's 227 KiB; 3.9 fits it), at BV = 32 208 KiB.
    bk, bv = _blocks(k, v)
    return bk, min(bv, 32) if bk >= 128 else bv


def _launch_options(bk: int) -> dict:
    # Software pipelining keeps num_stages copies of each chunk's w, q̃, k̃ [C, K], u and P tiles in
    # shared memory: with C = 64, Triton's default 3 stages need 442 KB at K = 128 and 262 KB at
    # K = 64 on sm_90, over the 227 KB a block may use, so the launch would fail. These fit sm_80's
    # 163 KB and sm_90's 227 KB (tests/test_triton_kda.py compiles them for both).
    return dict(num_warps=4, num_stages=3 if bk <= 32 else 2 if bk <= 64 else 1)


def compile_for_gpu(k: int = 128, v: int = 128, c: int = 64, capability: int = 90) -> dict[str, dict]:
    """Both kernels compiled ahead of time with the launch options above (see ``triton.aot``); needs a
    process without ``TRITON_INTERPRET=1``."""
    from braid.kernels.triton.aot import compile_stats

    bk, bv = _blocks(k, v)
    bwd_bv = _bwd_blocks(k, v)[1]
    return {fn.__name__: compile_stats(fn, dict(C=c, BK=bk, BV=blk_v, HAS_RESTART=True, HAS_DFINAL=True),
                                       lambda name: "*fp32" if name.endswith("_ptr") else "i32",
                                       _launch_options(bk), capability)
            for fn, blk_v in ((_kda_state_fwd, bv), (_kda_state_bwd, bwd_bv))}


class _KDAStateRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, qi, u, p, dec, ko, s0, dr, sr):
        b, h, nc, c, k = w.shape
        v = u.shape[-1]
        bk, bv = _blocks(k, v)
        xs = (w, qi, u, p, dec, ko, s0, dr, sr)
        ctx.dtypes = [None if x is None else x.dtype for x in xs]
        w, qi, u, p, dec, ko, s0, dr, sr = (None if x is None else x.float().contiguous() for x in xs)
        o = torch.empty(b, h, nc, c, v, dtype=torch.float32, device=w.device)
        states = torch.empty(b, h, nc, k, v, dtype=torch.float32, device=w.device)
        final = torch.empty(b, h, k, v, dtype=torch.float32, device=w.device)
        _kda_state_fwd[(b * h, triton.cdiv(v, bv))](w, qi, u, p, ko, dec, s0, dr, sr, o, states, final, nc, k, v,
                                                    C=c, BK=bk, BV=bv, HAS_RESTART=sr is not None,
                                                    **_launch_options(bk))
        ctx.save_for_backward(w, qi, u, p, dec, ko, dr, sr, states)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        w, qi, u, p, dec, ko, dr, sr, states = ctx.saved_tensors
        b, h, nc, c, k = w.shape
        v = u.shape[-1]
        bk, bv = _bwd_blocks(k, v)
        nv = triton.cdiv(v, bv)
        f32 = dict(dtype=torch.float32, device=w.device)
        du = torch.empty(b, h, nc, c, v, **f32)
        dw, dqi, dko = (torch.empty(nv, b, h, nc, c, k, **f32) for _ in range(3))
        dp = torch.empty(nv, b, h, nc, c, c, **f32)
        ddec = torch.empty(nv, b, h, nc, k, **f32)
        ds0 = torch.empty(b, h, k, v, **f32)
        restart = sr is not None
        ddr = torch.empty(nv, b, h, nc, k, **f32) if restart else None
        dsr = torch.empty(b, h, k, v, **f32) if restart else None
        if do is None:
            do = torch.zeros(b, h, nc, c, v, **f32)
        _kda_state_bwd[(b * h, nv)](w, qi, u, p, ko, dec, dr, sr, states, do.float().contiguous(),
                                    None if dfinal is None else dfinal.float().contiguous(),
                                    du, dw, dqi, dko, dp, ddec, ds0, ddr, dsr, b * h, nc, k, v, C=c, BK=bk, BV=bv,
                                    HAS_DFINAL=dfinal is not None, HAS_RESTART=restart, **_launch_options(bk))
        grads = (dw.sum(0), dqi.sum(0), du, dp.sum(0), ddec.sum(0), dko.sum(0), ds0,
                 ddr.sum(0) if restart else None, dsr)
        return tuple(None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes))


def kda_state_recurrence(w, q_in, u, p, decay, k_out, s0, restart_decay=None, restart_state=None):
    """The chunk loop of chunked KDA as one differentiable Triton op.

    Args:
        w, q_in, k_out: ``[B, H, N, C, K]``; u: ``[B, H, N, C, V]``; p: ``[B, H, N, C, C]``;
        decay: ``[B, H, N, K]``; s0: ``[B, H, K, V]`` (all fp32; C a power of two ≥ 16).
        restart_decay ``[B, H, N, K]`` and restart_state ``[B, H, K, V]`` (both or neither): each
        chunk-end state gets ``restart_decay[n, :, None] · restart_state`` added.
    Returns:
        ``(o [B, H, N, C, V], final state [B, H, K, V])``, both fp32.
    """
    c = w.shape[-2]
    if c < 16 or c & (c - 1):
        raise ValueError(f"kda: chunk_size must be a power of two ≥ 16 for the Triton backend, got {c}")
    if (restart_decay is None) != (restart_state is None):
        raise ValueError("kda: restart_decay and restart_state go together")
    return _KDAStateRecurrence.apply(w, q_in, u, p, decay, k_out, s0, restart_decay, restart_state)
