"""Mamba-1 selective scan: the public op (chunked parallel scan), a decoding step and the recurrent reference.

Recurrence, per batch row, channel c and state index n (A is diagonal, B/C are shared by channels):

    h_t[c, n] = exp(dt_t[c] · A[c, n]) · h_{t−1}[c, n] + dt_t[c] · B_t[n] · u_t[c]
    y_t[c]    = Σ_n C_t[n] · h_t[c, n] + D[c] · u_t[c]          (then y · silu(z_t[c]) if z is given)

Layout: time-major like the rest of braid, ``u, dt, z: [B, T, C]``, ``B, C: [B, T, N]``, ``A: [C, N]``,
state ``[B, C, N]``. (mamba_ssm uses channel-major ``[B, C, T]``; transpose at the call site if needed.)

Training path: the recurrence is a first-order linear scan ``h_t = a_t h_{t−1} + b_t`` with
``a = exp(dt·A) ∈ (0, 1]`` and ``b = dt·u·B``. All chunks of ``chunk_size`` positions are scanned
at once from a zero state (a loop over the positions of a chunk, never over T), the chunk-end states
are carried across chunks by a Hillis–Steele (log-step) scan, and each position then adds its
chunk's carried-in state. Only products of decays ≤ 1 and sums appear: no ``exp(−cumsum)`` factors
(the "cumulative log-decay" form) that overflow under strong decay, and no ``[T, T, C, N]`` decay
kernel (Mamba-1's decay differs per channel *and* state, so the masked-matmul form of Mamba-2 would
need one), so the result matches the recurrence to rounding.

Backward: the op is one autograd node that saves only its inputs (O(B·T·C), not the ``[B, T, C, N]``
states); backward recomputes the states with one more scan, runs the adjoint recurrence
``λ_t = g_t + a_{t+1} λ_{t+1}`` as a scan backwards in time, and forms every gradient from λ and h.
Peak memory is a few ``[B, T, C, N]`` fp32 tensors for the layer being computed, never O(T²).

Packed documents: ``reset[b, t] = True`` makes position t start again from ``initial_state`` (zeros
when None) instead of the carried state, so a state never crosses a document start.

Numerics: decays, states and the readout are computed in fp32 (fp64 when the inputs are fp64, for
gradcheck); y is returned in u's dtype and the final state in fp32/fp64.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from braid.kernels.backend import checked, resolve_backend
from braid.kernels.precision import compute_dtype
from braid.kernels.self_check import scan_signature

DEFAULT_CHUNK = 64


def _log_step_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of the maps ``h ↦ a_i h + b_i`` along ``dim`` (Hillis–Steele, log2(n) steps).

    Returns ``(a_cum, b_cum)`` with ``a_cum_i = Π_{j≤i} a_j`` and ``b_cum_i`` = the state at i when
    starting from 0. Out of place at every step because step k reads the previous step's values.
    """
    n, k = a.shape[dim], 1
    while k < n:
        a_hi, b_hi = a.narrow(dim, k, n - k), b.narrow(dim, k, n - k)
        a_lo, b_lo = a.narrow(dim, 0, n - k), b.narrow(dim, 0, n - k)
        b = torch.cat([b.narrow(dim, 0, k), b_hi + a_hi * b_lo], dim)
        a = torch.cat([a.narrow(dim, 0, k), a_hi * a_lo], dim)
        k *= 2
    return a, b


def _scan_within_chunks(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk, from a zero state: cumulative decays and states, ``a, b: [B, n_chunks, L, *S]``.

    A loop over the L positions of a chunk, each step updating every chunk at once: work-efficient
    (each element read and written once; a log-step scan would pass over the data log2(L) times)
    with the recurrence's own arithmetic; the loop length is the chunk size, never T.
    """
    a_cum, h = torch.empty_like(a), torch.empty_like(b)
    if is_fake(a):  # a rehearsal (braid.rehearse): no values, and the in-place loop allocates nothing more
        return a_cum, h
    a_cum[:, :, 0], h[:, :, 0] = a[:, :, 0], b[:, :, 0]
    for i in range(1, a.shape[2]):  # (in-place on slices: `out=` slices are far slower on CPU)
        a_cum[:, :, i].copy_(a_cum[:, :, i - 1]).mul_(a[:, :, i])
        h[:, :, i].copy_(b[:, :, i]).addcmul_(a[:, :, i], h[:, :, i - 1])
    return a_cum, h


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """All states of ``h_t = a_t · h_{t−1} + b_t`` (no autograd; used by forward and backward).

    Two levels: every chunk of ``chunk_size`` positions is scanned from a zero state (all chunks in
    parallel), the chunk-end states are carried across chunks by a log-step scan over the (few)
    chunks, and each position adds its chunk's carried-in state times its cumulative decay.

    Args:
        a, b: ``[B, T, *S]`` decays and inputs (same dtype); h0: ``[B, *S]`` state before t = 0, or None (0).
        chunk_size: positions per chunk.
    Returns:
        h ``[B, T, *S]``.
    """
    bsz, t = a.shape[:2]
    rest = a.shape[2:]
    size = max(1, min(chunk_size, t))
    pad = (-t) % size
    if pad:  # padding at the end cannot change earlier states
        a = torch.cat([a, a.new_ones(bsz, pad, *rest)], 1)
        b = torch.cat([b, b.new_zeros(bsz, pad, *rest)], 1)
    n_chunks = (t + pad) // size
    a_cum, h_local = _scan_within_chunks(a.reshape(bsz, n_chunks, size, *rest),
                                         b.reshape(bsz, n_chunks, size, *rest))
    # State at each chunk end, starting from 0, then carried across chunks.
    decay_end, carry_end = _log_step_scan(a_cum[:, :, -1], h_local[:, :, -1], 1)
    if h0 is not None:
        carry_end = carry_end + decay_end * h0[:, None]
    first = h0[:, None] if h0 is not None else carry_end.new_zeros(bsz, 1, *rest)
    start = torch.cat([first, carry_end[:, :-1]], 1)  # the state entering each chunk
    h = h_local.addcmul_(a_cum, start[:, :, None])
    return h.view(bsz, n_chunks * size, *rest)[:, :t]


def _discretize(u, dt, A, B, acc):
    """Decays ``a = exp(dt·A)`` and inputs ``b = dt·u·B``, both ``[B, T, C, N]`` in ``acc``."""
    dt = dt.to(acc)
    a = torch.exp(dt[..., None] * A.to(acc))
    b = (dt * u.to(acc))[..., None] * B.to(acc)[:, :, None, :]
    return a, b


def _readout(h, u, C, D, acc):
    """``Σ_n C·h + D·u`` (before the gate), ``[B, T, C]`` in ``acc``."""
    y = torch.einsum("btcn,btn->btc", h, C.to(acc))
    return y if D is None else y + D.to(acc) * u.to(acc)


def _states(u, dt, A, B, h0, reset, chunk_size, acc):
    """Decays ``a = exp(dt·A)`` ``[B, T, C, N]``, the reset mask ``[B, T, 1, 1]`` (or None) and all
    states ``h`` ``[B, T, C, N]``."""
    a, b = _discretize(u, dt, A, B, acc)
    r = None
    if reset is not None:
        r = reset.to(acc)[:, :, None, None]
        if h0 is not None:  # restarting from h0 adds a_t·h0 to the input of position t
            b = b + (r * a) * h0[:, None]
        h = linear_scan(a * (1 - r), b, h0, chunk_size)
    else:
        h = linear_scan(a, b, h0, chunk_size)
    return a, r, h


class _SelectiveScan(torch.autograd.Function):
    """The whole scan as one autograd node. Forward keeps only its O(B·T·C) inputs; backward
    recomputes the states (one more scan) instead of storing ``[B, T, C, N]`` tensors per layer."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, z, h0, reset, chunk_size):
        acc = compute_dtype(u)
        h0a = None if h0 is None else h0.to(acc)
        _, _, h = _states(u, dt, A, B, h0a, reset, chunk_size, acc)
        y = _readout(h, u, C, D, acc)
        if z is not None:
            y = y * F.silu(z.to(acc))
        ctx.save_for_backward(u, dt, A, B, C, D, z, h0, reset)
        ctx.chunk_size = chunk_size
        return y.to(u.dtype), h[:, -1].clone()

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        u, dt, A, B, C, D, z, h0, reset = ctx.saved_tensors
        acc = compute_dtype(u)
        uf, dtf, Af, Bf, Cf = (x.to(acc) for x in (u, dt, A, B, C))
        h0a = None if h0 is None else h0.to(acc)
        a, r, h = _states(u, dt, A, B, h0a, reset, ctx.chunk_size, acc)
        gy = grad_y.to(acc)
        grad = dict.fromkeys(("u", "dt", "A", "B", "C", "D", "z", "h0"))
        if z is not None:  # y = pre · silu(z), silu'(z) = σ(z)(1 + z(1 − σ(z)))
            zf = z.to(acc)
            sig = torch.sigmoid(zf)
            grad["z"] = gy * _readout(h, u, C, D, acc) * sig * (1 + zf * (1 - sig))
            gy = gy * zf * sig
        grad["C"] = torch.einsum("btcn,btc->btn", h, gy)
        if D is not None:
            grad["D"] = (gy * uf).sum((0, 1))
        # Adjoint of the states: λ_t = ∂L/∂h_t = g_t + a_{t+1} λ_{t+1}, the same scan run backwards
        # in time with the decays shifted by one position.
        g = gy[..., None] * Cf[:, :, None, :]
        if grad_final is not None:
            g[:, -1] += grad_final.to(acc)
        a_eff = a if r is None else a * (1 - r)
        a_next = torch.cat([a_eff[:, 1:], a_eff.new_zeros(a_eff[:, :1].shape)], 1)
        lam = linear_scan(a_next.flip(1), g.flip(1), None, ctx.chunk_size).flip(1)
        del g, a_next
        first = h0a[:, None] if h0a is not None else h.new_zeros(h[:, :1].shape)
        ga = lam * torch.cat([first, h[:, :-1]], 1)  # ∂L/∂a_eff_t = λ_t · h_{t−1}
        del h
        if h0a is not None:
            grad["h0"] = a_eff[:, 0] * lam[:, 0]
        if r is not None:  # a_eff = a·(1 − r) and b gains r·a·h0
            ga = ga * (1 - r)
            if h0a is not None:
                ga = ga + r * lam * h0a[:, None]
                grad["h0"] = grad["h0"] + (r * a * lam).sum(1)
        # a = exp(dt·A): ∂L/∂(dt·A) = ga·a.
        # b = (dt·u)·B: ∂L/∂(dt·u) = Σ_n λ·B and ∂L/∂B = Σ_c λ·(dt·u).
        g_log = ga * a
        del ga, a, a_eff
        g_du = torch.einsum("btcn,btn->btc", lam, Bf)
        grad["B"] = torch.einsum("btcn,btc->btn", lam, dtf * uf)
        grad["A"] = torch.einsum("btcn,btc->cn", g_log, dtf)
        grad["dt"] = torch.einsum("btcn,cn->btc", g_log, Af) + g_du * uf
        grad["u"] = g_du * dtf + (gy * D.to(acc) if D is not None else 0)
        inputs = dict(u=u, dt=dt, A=A, B=B, C=C, D=D, z=z, h0=h0)
        out = [None if x is None or grad[k] is None else grad[k].to(x.dtype) for k, x in inputs.items()]
        return (*out, None, None)


def selective_scan(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    *,
    initial_state: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    backend: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Mamba-1 selective scan (see the module docstring for the recurrence).

    Args:
        u: ``[B, T, C]`` input; dt: ``[B, T, C]`` positive step sizes (softplus already applied).
        A: ``[C, N]`` state decay rates (negative); B, C: ``[B, T, N]`` input-dependent in/out maps.
        D: ``[C]`` skip weights, or None; z: ``[B, T, C]`` gate (``y · silu(z)``), or None.
        initial_state: ``[B, C, N]`` state before position 0 (fp32 best), or None for zeros.
        reset: ``[B, T]`` bool; where True the state restarts from ``initial_state`` (zeros if None)
            before position t is added, e.g. at document starts of a packed sequence.
        output_final_state: also return the state after the last position.
        chunk_size: positions per chunk of the parallel scan (torch) or between state checkpoints
            (Triton); affects speed and memory only.
        backend: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``
            (on CPU tensors in Triton's interpreter, for tests); Triton computes in fp32 and returns
            an fp32 final state (``auto`` keeps fp64 inputs on torch).
    Returns:
        y ``[B, T, C]`` in u's dtype; with ``output_final_state`` also the state ``[B, C, N]`` in
        fp32 (fp64 for fp64 inputs).
    """
    if chunk_size <= 0:
        raise ValueError(f"selective_scan: chunk_size must be > 0, got {chunk_size}")
    use_triton = resolve_backend(backend, u, "selective_scan") == "triton"
    if backend == "auto" and u.dtype == torch.float64:
        use_triton = False  # the kernels compute in fp32; fp64 (gradcheck) stays on torch
    if backend == "auto" and use_triton:
        use_triton = checked("selective_scan", scan_signature(u, A, D=D, z=z, initial_state=initial_state,
                                                              reset=reset, chunk_size=chunk_size), u) == "triton"
    if use_triton:
        from braid.kernels.triton import load

        scan = load("scan", interpret=not u.is_cuda).SelectiveScanTriton
        y, final = scan.apply(u, dt, A, B, C, D, z, initial_state, reset, chunk_size)
    else:
        y, final = _SelectiveScan.apply(u, dt, A, B, C, D, z, initial_state, reset, chunk_size)
    return (y, final) if output_final_state else y


def selective_state_step(
    state: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of the recurrence.

    Args:
        state: ``[B, C, N]`` state before this position (fp32); u, dt, z: ``[B, C]``; B, C: ``[B, N]``;
            A: ``[C, N]``; D: ``[C]`` or None.
    Returns:
        ``(y [B, C]`` in u's dtype, ``new_state [B, C, N]`` in the state's accumulation dtype).
    """
    acc = compute_dtype(u, state)
    a, b = _discretize(u[:, None], dt[:, None], A, B[:, None], acc)
    new_state = a[:, 0] * state.to(acc) + b[:, 0]
    y = _readout(new_state[:, None], u[:, None], C[:, None], D, acc)[:, 0]
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype), new_state


def selective_scan_recurrent(
    u, dt, A, B, C, D=None, z=None, *, initial_state=None, reset=None, output_final_state=False
):
    """Reference: the same contract as :func:`selective_scan`, one :func:`selective_state_step` per
    position (a Python loop over T; for tests and debugging only)."""
    bsz, t, ch = u.shape
    acc = compute_dtype(u)
    h0 = (u.new_zeros(bsz, ch, A.shape[1], dtype=acc) if initial_state is None
          else initial_state.to(acc))
    state, ys = h0, []
    for i in range(t):
        if reset is not None:
            state = torch.where(reset[:, i, None, None], h0, state)
        y, state = selective_state_step(state, u[:, i], dt[:, i], A, B[:, i], C[:, i], D,
                                        None if z is None else z[:, i])
        ys.append(y)
    y = torch.stack(ys, 1)
    return (y, state) if output_final_state else y
