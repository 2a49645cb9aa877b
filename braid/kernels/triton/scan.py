"""Triton Mamba-1 selective scan, forward and backward (``braid.kernels.ssm`` semantics).

One program owns a batch row and a block of ``BC`` channels with their full ``[BC, N]`` state in
registers (fp32) and walks the sequence: parallelism is B × C / BC, as in Mamba-1's own kernel.
The forward writes the state at every chunk start (``[B, n_chunks, C, N]`` fp32, T/CHUNK states, not
T). The backward walks the chunks in reverse: it recomputes the chunk's states from its checkpoint into
a per-program scratch buffer (``CHUNK × BC × N`` fp32), then runs the adjoint recurrence
``λ_t = g_t + a_{t+1} λ_{t+1}`` backwards over the chunk. Gradients that sum over channels (B, C) or
over time and batch (A, D) are written as per-program partial sums and reduced by torch.

Import only when Triton should run (CUDA, or ``TRITON_INTERPRET=1`` set before the import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _channel_block(cb, C, N, BC: tl.constexpr, BN: tl.constexpr):
    """Channels ch [BC] (mask cm) and states n [BN] (mask nm) of block cb, and their [BC, BN] offsets
    cn (mask m2)."""
    ch = cb * BC + tl.arange(0, BC)
    n = tl.arange(0, BN)
    cm, nm = ch < C, n < N
    return ch, n, cm, nm, cm[:, None] & nm[None, :], ch[:, None] * N + n[None, :]


@triton.jit
def _block_params(a_ptr, d_ptr, h0_ptr, b, C, N, ch, cm, cn, m2, BC: tl.constexpr, BN: tl.constexpr,
                  HAS_D: tl.constexpr, HAS_H0: tl.constexpr):
    """A [BC, BN], h0 [BC, BN] of row b (zeros if none) and D [BC] (zeros if none) of the block, fp32."""
    A = tl.load(a_ptr + cn, mask=m2, other=0.0).to(tl.float32)
    h0 = tl.zeros([BC, BN], dtype=tl.float32)
    if HAS_H0:
        h0 = tl.load(h0_ptr + b * C * N + cn, mask=m2, other=0.0).to(tl.float32)
    Dv = tl.zeros([BC], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(d_ptr + ch, mask=cm, other=0.0).to(tl.float32)
    return A, h0, Dv


@triton.jit
def _step_inputs(u_ptr, dt_ptr, b_ptr, b, t, T, C, N, ch, n, cm, nm):
    """Row offsets (b, t, ch) and u, dt [BC], B [BN] at position t, fp32."""
    row = (b * T + t) * C + ch
    uv = tl.load(u_ptr + row, mask=cm, other=0.0).to(tl.float32)
    dtv = tl.load(dt_ptr + row, mask=cm, other=0.0).to(tl.float32)
    Bv = tl.load(b_ptr + (b * T + t) * N + n, mask=nm, other=0.0).to(tl.float32)
    return row, uv, dtv, Bv


@triton.jit
def _scan_fwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, h0_ptr, reset_ptr,
              y_ptr, ckpt_ptr, final_ptr, T, C, N,
              CHUNK: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr,
              HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr):
    b, cb = tl.program_id(0), tl.program_id(1)
    ch, n, cm, nm, m2, cn = _channel_block(cb, C, N, BC, BN)
    A, h0, Dv = _block_params(a_ptr, d_ptr, h0_ptr, b, C, N, ch, cm, cn, m2, BC, BN, HAS_D, HAS_H0)
    h = h0
    n_chunks = tl.cdiv(T, CHUNK)
    for t in range(T):
        if t % CHUNK == 0:  # checkpoint: the state entering this chunk
            tl.store(ckpt_ptr + ((b * n_chunks + t // CHUNK) * C) * N + cn, h, mask=m2)
        row, uv, dtv, Bv = _step_inputs(u_ptr, dt_ptr, b_ptr, b, t, T, C, N, ch, n, cm, nm)
        Cv = tl.load(c_ptr + (b * T + t) * N + n, mask=nm, other=0.0).to(tl.float32)
        if HAS_RESET:
            r = tl.load(reset_ptr + b * T + t)
            h = tl.where(r != 0, h0, h)
        h = tl.exp(dtv[:, None] * A) * h + (dtv * uv)[:, None] * Bv[None, :]
        yv = tl.sum(h * Cv[None, :], axis=1) + Dv * uv
        if HAS_Z:
            zv = tl.load(z_ptr + row, mask=cm, other=0.0).to(tl.float32)
            yv = yv * zv * tl.sigmoid(zv)
        tl.store(y_ptr + row, yv.to(y_ptr.dtype.element_ty), mask=cm)
    tl.store(final_ptr + b * C * N + cn, h, mask=m2)


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, h0_ptr, reset_ptr, ckpt_ptr,
              dy_ptr, dfinal_ptr, scratch_ptr,
              du_ptr, ddt_ptr, dz_ptr, db_part_ptr, dc_part_ptr, da_part_ptr, dd_part_ptr, dh0_ptr,
              T, C, N,
              CHUNK: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr,
              HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DFINAL: tl.constexpr):
    b, cb = tl.program_id(0), tl.program_id(1)
    n_cb = tl.num_programs(1)
    ch, n, cm, nm, m2, cn = _channel_block(cb, C, N, BC, BN)
    A, h0, Dv = _block_params(a_ptr, d_ptr, h0_ptr, b, C, N, ch, cm, cn, m2, BC, BN, HAS_D, HAS_H0)
    local = tl.arange(0, BC)[:, None] * BN + n[None, :]  # scratch layout [CHUNK, BC, BN]
    scratch = scratch_ptr + (b * n_cb + cb) * CHUNK * BC * BN
    carry = tl.zeros([BC, BN], dtype=tl.float32)  # a_{t+1}·λ_{t+1}: what λ_t inherits from the future
    if HAS_DFINAL:
        carry = tl.load(dfinal_ptr + b * C * N + cn, mask=m2, other=0.0).to(tl.float32)
    dA = tl.zeros([BC, BN], dtype=tl.float32)
    dD = tl.zeros([BC], dtype=tl.float32)
    dh0 = tl.zeros([BC, BN], dtype=tl.float32)
    n_chunks = tl.cdiv(T, CHUNK)
    for k in range(n_chunks):
        chunk = n_chunks - 1 - k
        t0 = chunk * CHUNK
        t1 = tl.minimum(t0 + CHUNK, T)
        start = tl.load(ckpt_ptr + ((b * n_chunks + chunk) * C) * N + cn, mask=m2, other=0.0)
        # Recompute this chunk's states into the scratch buffer.
        h = start
        for t in range(t0, t1):
            row, uv, dtv, Bv = _step_inputs(u_ptr, dt_ptr, b_ptr, b, t, T, C, N, ch, n, cm, nm)
            if HAS_RESET:
                h = tl.where(tl.load(reset_ptr + b * T + t) != 0, h0, h)
            h = tl.exp(dtv[:, None] * A) * h + (dtv * uv)[:, None] * Bv[None, :]
            tl.store(scratch + (t - t0) * BC * BN + local, h)
        tl.debug_barrier()  # the reverse walk reads states other threads may have written
        for i in range(t1 - t0):
            t = t1 - 1 - i
            row, uv, dtv, Bv = _step_inputs(u_ptr, dt_ptr, b_ptr, b, t, T, C, N, ch, n, cm, nm)
            Cv = tl.load(c_ptr + (b * T + t) * N + n, mask=nm, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row, mask=cm, other=0.0).to(tl.float32)
            h = tl.load(scratch + (t - t0) * BC * BN + local)
            if t > t0:
                hprev = tl.load(scratch + (t - t0 - 1) * BC * BN + local)
            else:
                hprev = start
            r = 0
            if HAS_RESET:
                r = tl.load(reset_ptr + b * T + t).to(tl.int32)
                hprev = tl.where(r != 0, h0, hprev)
            gy = dy
            if HAS_Z:  # y = pre · silu(z)
                zv = tl.load(z_ptr + row, mask=cm, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zv)
                pre = tl.sum(h * Cv[None, :], axis=1) + Dv * uv
                tl.store(dz_ptr + row, (dy * pre * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                         mask=cm)
                gy = dy * zv * sig
            part = ((b * n_cb + cb) * T + t) * N + n
            tl.store(dc_part_ptr + part, tl.sum(h * gy[:, None], axis=0), mask=nm)
            dD += gy * uv
            lam = carry + gy[:, None] * Cv[None, :]
            a = tl.exp(dtv[:, None] * A)
            g_log = lam * hprev * a  # ∂L/∂(dt·A)
            dA += g_log * dtv[:, None]
            g_du = tl.sum(lam * Bv[None, :], axis=1)  # ∂L/∂(dt·u)
            tl.store(ddt_ptr + row, (tl.sum(g_log * A, axis=1) + g_du * uv).to(ddt_ptr.dtype.element_ty), mask=cm)
            tl.store(du_ptr + row, (g_du * dtv + gy * Dv).to(du_ptr.dtype.element_ty), mask=cm)
            tl.store(db_part_ptr + part, tl.sum(lam * (dtv * uv)[:, None], axis=0), mask=nm)
            carry = a * lam
            if HAS_RESET:  # a restarted position took h0, not h_{t−1}
                dh0 += tl.where(r != 0, carry, 0.0)
                carry = tl.where(r != 0, 0.0, carry)
        tl.debug_barrier()  # the next chunk overwrites the scratch buffer
    dh0 += carry  # position 0 always starts from h0
    tl.store(dh0_ptr + b * C * N + cn, dh0, mask=m2)
    tl.store(da_part_ptr + b * C * N + cn, dA, mask=m2)
    tl.store(dd_part_ptr + b * C + ch, dD, mask=cm)


def _blocks(c: int, n: int) -> tuple[int, int]:
    bn = triton.next_power_of_2(n)
    return max(1, min(triton.next_power_of_2(c), 2048 // bn, 64)), bn  # ≤ 2k fp32 state per program


def compile_for_gpu(channels: int = 1536, d_state: int = 16, chunk: int = 64, dtype: str = "bf16",
                    capability: int = 90) -> dict[str, dict]:
    """Both kernels compiled ahead of time with their launch sizes and every option on (see
    ``triton.aot``); needs a process without ``TRITON_INTERPRET=1``."""
    from braid.kernels.triton.aot import compile_stats

    bc, bn = _blocks(channels, d_state)
    consts = dict(CHUNK=chunk, BC=bc, BN=bn, HAS_D=True, HAS_Z=True, HAS_H0=True, HAS_RESET=True, HAS_DFINAL=True)
    activations = {"u_ptr", "dt_ptr", "b_ptr", "c_ptr", "z_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddt_ptr", "dz_ptr"}

    def arg_type(name: str) -> str:
        if name == "reset_ptr":
            return "*i8"
        if name in activations:
            return f"*{dtype}"
        return "*fp32" if name.endswith("_ptr") else "i32"

    return {fn.__name__: compile_stats(fn, consts, arg_type, {}, capability) for fn in (_scan_fwd, _scan_bwd)}


class SelectiveScanTriton(torch.autograd.Function):
    """Same contract as ``braid.kernels.ssm._SelectiveScan``: returns ``(y, final_state)``."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, z, h0, reset, chunk_size):
        bsz, t, c = u.shape
        n = A.shape[1]
        bc, bn = _blocks(c, n)
        u, dt, A, B, C = (x.contiguous() for x in (u, dt, A, B, C))
        D = None if D is None else D.contiguous()
        z = None if z is None else z.contiguous()
        h0c = None if h0 is None else h0.contiguous()
        rst = None if reset is None else reset.to(torch.int8).contiguous()
        n_chunks = triton.cdiv(t, chunk_size)
        y = torch.empty_like(u)
        ckpt = torch.empty(bsz, n_chunks, c, n, dtype=torch.float32, device=u.device)
        final = torch.empty(bsz, c, n, dtype=torch.float32, device=u.device)
        grid = (bsz, triton.cdiv(c, bc))
        _scan_fwd[grid](u, dt, A, B, C, D, z, h0c, rst, y, ckpt, final, t, c, n,
                        CHUNK=chunk_size, BC=bc, BN=bn, HAS_D=D is not None, HAS_Z=z is not None,
                        HAS_H0=h0 is not None, HAS_RESET=reset is not None)
        ctx.save_for_backward(u, dt, A, B, C, D, z, h0c, rst, ckpt)
        ctx.chunk_size = chunk_size
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        u, dt, A, B, C, D, z, h0, rst, ckpt = ctx.saved_tensors
        bsz, t, c = u.shape
        n = A.shape[1]
        bc, bn = _blocks(c, n)
        n_cb = triton.cdiv(c, bc)
        chunk = ctx.chunk_size
        dev = u.device
        f32 = dict(dtype=torch.float32, device=dev)
        scratch = torch.empty(bsz * n_cb * chunk * bc * bn, **f32)
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dz = None if z is None else torch.empty_like(z)
        db_part, dc_part = torch.empty(bsz, n_cb, t, n, **f32), torch.empty(bsz, n_cb, t, n, **f32)
        da_part, dd_part = torch.empty(bsz, c, n, **f32), torch.empty(bsz, c, **f32)
        dh0 = torch.empty(bsz, c, n, **f32)
        _scan_bwd[(bsz, n_cb)](u, dt, A, B, C, D, z, h0, rst, ckpt, dy.contiguous(),
                               None if dfinal is None else dfinal.contiguous(), scratch,
                               du, ddt, dz, db_part, dc_part, da_part, dd_part, dh0, t, c, n,
                               CHUNK=chunk, BC=bc, BN=bn, HAS_D=D is not None, HAS_Z=z is not None,
                               HAS_H0=h0 is not None, HAS_RESET=rst is not None, HAS_DFINAL=dfinal is not None)
        dB = db_part.sum(1).to(B.dtype)
        dC = dc_part.sum(1).to(C.dtype)
        dA = da_part.sum(0).to(A.dtype)
        dD = None if D is None else dd_part.sum(0).to(D.dtype)
        dh0 = None if h0 is None else dh0.to(h0.dtype)
        return du, ddt, dA, dB, dC, dD, dz, dh0, None, None
