"""KDA (Kimi Delta Attention): the public op, the one-token recurrent step and the recurrent reference.

Per head, with a state ``S ∈ R^{K×V}``:

    S_t = (I − β_t k_t k_tᵀ) · Diag(exp g_t) · S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ (scale · q_t)

``g`` is a per-key-channel log decay (≤ 0). Training uses the chunked algorithm
(``braid.kernels.kda_chunk``); decoding uses ``kda_recurrent_step``; ``kda_recurrent`` loops the step
over a sequence and is the reference the chunked path is tested against.
"""

from __future__ import annotations

from typing import Optional

import torch

from braid.kernels.backend import checked, resolve_backend
from braid.kernels.kda_chunk import kda_chunk
from braid.kernels.precision import compute_dtype
from braid.kernels.self_check import kda_signature

# Sub-chunk size of the chunked path: pairs inside one sub-chunk form exponent differences explicitly
# (memory T·8·K), pairs further apart use matmuls.
SUB_CHUNK = 8


def _check_shapes(q, k, v, g, beta, initial_state, doc_ids, restart_state=None) -> None:
    if q.dim() != 4 or q.shape != k.shape or g.shape != k.shape:
        raise ValueError(f"kda: q {tuple(q.shape)}, k {tuple(k.shape)}, g {tuple(g.shape)} must all be [B,T,H,K]")
    b, t, h, dk = k.shape
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"kda: v {tuple(v.shape)} must be [B,T,H,V] with [B,T,H] = {(b, t, h)}")
    if beta.shape != (b, t, h):
        raise ValueError(f"kda: beta {tuple(beta.shape)} must be [B,T,H] = {(b, t, h)}")
    for name, state in (("initial_state", initial_state), ("restart_state", restart_state)):
        if state is not None and state.shape != (b, h, dk, v.shape[-1]):
            raise ValueError(f"kda: {name} {tuple(state.shape)} must be [B,H,K,V] = {(b, h, dk, v.shape[-1])}")
    if doc_ids is not None and doc_ids.shape != (b, t):
        raise ValueError(f"kda: doc_ids {tuple(doc_ids.shape)} must be [B,T] = {(b, t)}")


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    doc_ids: Optional[torch.Tensor] = None,
    restart_state: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Kimi Delta Attention over a sequence (chunked algorithm; differentiable).

    Args:
        q, k: ``[B, T, H, K]`` (the layer L2-normalises them; the op does not).
        v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` per-channel log decay, ≤ 0 (any magnitude; strong decays do not overflow).
        beta: ``[B, T, H]`` delta-rule step, usually in (0, 1).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token (fp32), or None for zeros.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk (T need not be a multiple).
        doc_ids: ``[B, T]`` document ids of packed rows, or None. The state is reset (to
            ``restart_state``) before every token whose id differs from the previous token's; the
            initial state feeds the first document of each row.
        restart_state: ``[B, H, K, V]`` state every document start resets to, or None for zeros
            (unused without doc_ids). With meta tokens run first, their final state makes each
            packed document compute what it computes alone behind the meta tokens.
        backend: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"torch"``, or ``"triton"``
            (on CPU only under ``TRITON_INTERPRET=1``, for tests). Triton runs the intra-chunk WY/UT
            transform and the inter-chunk state recurrence as kernels (forward and backward, fp32);
            it needs a power-of-two ``chunk_size`` ≥ 16.
    Returns:
        ``o`` ``[B, T, H, V]`` in v's dtype, and the final state ``[B, H, K, V]`` (fp32; fp64 when the
        inputs are fp64) or None. All arithmetic runs in fp32 (fp64 for fp64 inputs).
    """
    state_backend = resolve_backend(backend, k, "kda")
    pow2_chunk = chunk_size >= 16 and not chunk_size & (chunk_size - 1)
    if backend == "auto" and (not pow2_chunk or k.dtype == torch.float64):
        state_backend = "torch"  # the kernels compute in fp32 and need a power-of-two chunk
    if chunk_size <= 0:
        raise ValueError(f"kda: chunk_size must be > 0, got {chunk_size}")
    if state_backend == "triton" and not pow2_chunk:
        raise ValueError(f"kda: chunk_size must be a power of two ≥ 16 for backend='triton', got {chunk_size}")
    _check_shapes(q, k, v, g, beta, initial_state, doc_ids, restart_state)
    if backend == "auto" and state_backend == "triton":
        state_backend = checked("kda", kda_signature(q, v, chunk_size=chunk_size, doc_ids=doc_ids,
                                                     initial_state=initial_state, restart_state=restart_state), k)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return kda_chunk(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, chunk_size=chunk_size, sub_chunk=SUB_CHUNK,
                     doc_ids=doc_ids, restart_state=restart_state, state_backend=state_backend)


def kda_recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: Optional[torch.Tensor],
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of KDA (decoding).

    Args:
        q, k, g: ``[B, H, K]``; v: ``[B, H, V]``; beta: ``[B, H]``;
        state: ``[B, H, K, V]`` or None (zeros); scale: default ``K ** -0.5``.
    Returns:
        ``(o [B, H, V] in v's dtype, new state [B, H, K, V] in fp32, fp64 for fp64 inputs)``.
    """
    cdt = compute_dtype(q, k, v, g, beta, state)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(cdt) for x in (q, k, v, g, beta))
    if state is None:
        state = torch.zeros(*k.shape, v.shape[-1], dtype=cdt, device=k.device)
    s = torch.exp(g)[..., None] * state.to(cdt)  # Diag(exp g) S
    pred = (k[..., None] * s).sum(-2)  # kᵀ S: what the state currently returns for k
    s = s + k[..., None] * (beta[..., None] * (v - pred))[..., None, :]
    o = (s * (scale * q)[..., None]).sum(-2)
    return o.to(v.dtype), s


def kda_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    doc_ids: Optional[torch.Tensor] = None,
    restart_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-by-token KDA: the reference for ``kda`` (same arguments and returns, no chunking).

    Slow (a Python loop over T); for tests and as the definition of the semantics.
    """
    _check_shapes(q, k, v, g, beta, initial_state, doc_ids, restart_state)
    b, t, h, dk = k.shape
    cdt = compute_dtype(q, k, v, g, beta, initial_state, restart_state)
    s = torch.zeros(b, h, dk, v.shape[-1], dtype=cdt, device=k.device) if initial_state is None \
        else initial_state.to(cdt)
    outs = []
    for i in range(t):
        if doc_ids is not None and i > 0:
            keep = (doc_ids[:, i] == doc_ids[:, i - 1]).to(cdt)[:, None, None, None]
            s = s * keep  # a document start resets the state (to zeros, or the restart state)
            if restart_state is not None:
                s = s + (1 - keep) * restart_state.to(cdt)
        o, s = kda_recurrent_step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], s, scale)
        outs.append(o)
    return torch.stack(outs, dim=1), (s if output_final_state else None)
