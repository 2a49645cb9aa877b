"""Softmax attention: the public op, its dispatch and the mask helper.

Semantics (shared by every implementation: SDPA, the blocked torch path, a future Triton kernel):

* q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]`` (Dv may differ), ``T ≤ S``;
  query ``i`` sits at key position ``p_i = S − T + i`` (the last T positions, as when decoding
  with a cache). Query head ``h`` uses kv head ``h // (Hq / Hkv)``.
* logits ``s_ij = scale · q_i·k_j (+ c_{p_i} − c_j with FoX)``, ``c = cumsum(log_forget)`` over the
  S positions in fp32 (so ``c_{p_i} − c_j = Σ_{j<l≤p_i} log f_l``). Sink keys (``j < sink``) get no
  forget term: they never fade, and the gates of other documents between a sink and a query (which
  ``c_{p_i} − c_j`` would sum) cannot leak into it.
* key j is visible to query i iff ``causal_ok ∧ (j < sink ∨ (in_window ∧ same_doc))``:
  causal_ok = ``j ≤ p_i`` (or always, when not causal); in_window = ``p_i − j < window`` (and
  ``j − p_i < window`` when not causal); same_doc = ``doc_ids[p_i] == doc_ids[j]``. Sinks (Hymba
  meta tokens, doc id −1) are seen by every later query whatever its window or document.
* S2 (``s2=S2Pattern(...)``, ``braid.kernels.s2``): a per-head block pattern further restricts the
  non-sink keys (``… ∧ s2_ok``); work on both paths skips the blocks a head does not see.
* ``o_i = Σ_j softmax_j(s_ij) v_j`` over visible keys, returned in q's dtype; ``lse_i`` = fp32
  log-sum-exp of the visible logits. A row with no visible key has o = 0 and lse = −∞.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from braid.kernels import attention_blocked
from braid.kernels.attention_blocked import visibility
from braid.kernels.backend import BACKENDS, resolve_backend  # noqa: F401 (both re-exported)
from braid.kernels.s2 import S2Pattern
from braid.kernels.self_check import attention_signature

# Above this many (query, key) pairs per (batch row, head) an explicit SDPA mask costs too much memory
# (it grows as T·S), so masked attention takes the blocked path. Plain causal/full attention needs no
# mask and always uses SDPA (its flash / memory-efficient backends are O(T) memory).
SDPA_MASK_MAX_PAIRS = 2048 * 2048


def attention_mask(
    t: int,
    s: int,
    *,
    causal: bool = True,
    window: Optional[int] = None,
    doc_ids: Optional[torch.Tensor] = None,
    sink: int = 0,
    device: Union[torch.device, str] = "cpu",
) -> Optional[torch.Tensor]:
    """Boolean mask (True = may attend) ``[B or 1, 1, T, S]``; None when plain causal/full suffices.

    Queries are the last ``t`` of the ``s`` key positions (so decoding with a cache lines up).
    None means no mask is needed beyond SDPA's own ``is_causal`` for square causal attention.
    ``doc_ids`` ``[B, S]``: keys and queries attend only within the same document id.
    ``sink``: the first ``sink`` keys are visible to every (later, if causal) query.
    """
    if window is None and doc_ids is None and (t == s or not causal):
        return None  # sinks add nothing when every earlier key is visible anyway
    q_doc = None if doc_ids is None else doc_ids[:, s - t:]
    mask = visibility(torch.arange(s - t, s, device=device), torch.arange(s, device=device),
                      causal=causal, window=window, sink=sink, q_doc=q_doc, k_doc=doc_ids)
    return mask[:, None]


def _check(q, k, v, doc_ids, log_forget) -> None:
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[0] != b or hq % hkv != 0:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} "
                         "must be [B,T,Hq,D] and [B,S,Hkv,D] with Hq a multiple of Hkv")
    if t > s:
        raise ValueError(f"attention: {t} queries but only {s} keys; queries are the last T of S")
    if doc_ids is not None and tuple(doc_ids.shape) != (b, s):
        raise ValueError(f"attention: doc_ids {tuple(doc_ids.shape)} must be [B,S] = {(b, s)}")
    if log_forget is not None and tuple(log_forget.shape) != (b, s, hq):
        raise ValueError(f"attention: log_forget {tuple(log_forget.shape)} must be [B,S,Hq] = {(b, s, hq)}")


def _use_sdpa(t: int, s: int, *, causal: bool, log_forget, window, sink: int, doc_ids, return_lse: bool,
              s2=None) -> bool:
    """SDPA when it is exact (no forget gate, no lse wanted) and cheap (no mask, or a small one)."""
    if s2 is not None:  # a per-head mask; the blocked path skips the blocks S2 hides
        return False
    if log_forget is not None or return_lse:
        return False
    needs_mask = window is not None or doc_ids is not None or (causal and t != s)
    return not needs_mask or t * s <= SDPA_MASK_MAX_PAIRS


def attention(
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
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Scaled dot-product attention with GQA, sliding window, sinks, documents and FoX forget gates.

    Args:
        q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``Hq % Hkv == 0``,
            ``T ≤ S`` (K/V are not repeated for GQA).
        causal: query i (at position S − T + i) sees keys j ≤ its position.
        scale: logit scale, default ``D ** -0.5``.
        log_forget: ``[B, S, Hq]`` natural log of the FoX forget gate (≤ 0) at every key position,
            best in fp32; logits get ``c_i − c_j`` with ``c`` its inclusive cumulative sum (fp32),
            except on sink keys.
        window: if set, only keys within the last ``window`` positions (self included) are visible.
        sink: the first ``sink`` key positions are visible to every query (outside the window,
            whatever the document), e.g. Hymba's meta tokens.
        doc_ids: ``[B, S]`` integer document ids of a packed sequence; attention stays within a
            document (except for sinks).
        s2: S2 strided block-sparse pattern (``braid.kernels.s2.S2Pattern``), per query head.
        return_lse: also return the log-sum-exp of each row's visible logits.
        backend: ``"auto"`` (plain unmasked attention: SDPA; otherwise Triton on CUDA tensors, torch
            elsewhere), ``"torch"`` (SDPA or the
            blocked torch path) or ``"triton"`` (on CPU tensors: Triton's interpreter, for tests; no
            environment variable needed, see ``braid.kernels.triton``).
    Returns:
        o ``[B, T, Hq, Dv]`` in the dtype of ``q``; with ``return_lse`` also lse ``[B, Hq, T]`` fp32
        (fp64 for fp64 inputs), differentiable.
        Rows with no visible key give o = 0 and lse = −inf (never NaN).
    """
    _check(q, k, v, doc_ids, log_forget)
    if s2 is not None and not isinstance(s2, S2Pattern):
        raise ValueError(f"attention: s2 must be a braid.kernels.s2.S2Pattern or None, got {type(s2).__name__}")
    t, s = q.shape[1], k.shape[1]
    plain = log_forget is None and window is None and not sink and doc_ids is None and s2 is None \
        and not return_lse and (t == s or not causal)
    if backend == "auto" and plain:
        # SDPA's flash backend is the measured baseline; our Triton kernel takes over plain attention
        # only once bench/kernels.py shows it ahead on the GPU (not measured yet).
        return _sdpa(q, k, v, causal=causal, scale=scale, window=window, sink=sink, doc_ids=doc_ids)
    use = resolve_backend(backend, q, "attention", attention_signature(
        q, k, v, causal=causal, window=window, sink=sink, doc_ids=doc_ids, log_forget=log_forget, s2=s2,
        return_lse=return_lse))
    if use == "torch" and _use_sdpa(t, s, causal=causal, log_forget=log_forget, window=window, sink=sink,
                                    doc_ids=doc_ids, return_lse=return_lse, s2=s2):
        return _sdpa(q, k, v, causal=causal, scale=scale, window=window, sink=sink, doc_ids=doc_ids)
    # S2 on the torch path: blocks aligned with the pattern's, so skipped tiles are whole S2 blocks.
    block = attention_blocked.BLOCK_Q if s2 is None else max(16, s2.block)
    o, lse = attention_blocked.blocked_attention(
        q, k, v, causal=causal, scale=scale, log_forget=log_forget, window=window, sink=sink,
        doc_ids=doc_ids, s2=s2, block_q=block, block_k=block, backend=use,
    )
    return (o, lse) if return_lse else o


def _sdpa(q, k, v, *, causal, scale, window, sink, doc_ids) -> torch.Tensor:
    """The fast path: torch SDPA with an explicit boolean mask only when one is needed."""
    t, s = q.shape[1], k.shape[1]
    mask = attention_mask(t, s, causal=causal, window=window, doc_ids=doc_ids, sink=sink, device=q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal and mask is None and t == s,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
