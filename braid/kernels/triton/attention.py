"""Triton attention: launchers and the autograd Function behind ``backend="triton"``.

``triton_attention`` has the semantics and signature of ``braid.kernels.attention_blocked.partial_attention``
(explicit query offset, separate query/key documents, FoX cumulative gates c_q/c_k, S2 pattern), so
the public op and context-parallel code reach it the same way. The kernels live in
``attention_kernels.py``; on CPU tensors they run in Triton's interpreter (``braid.kernels.triton.load``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from braid.kernels.s2 import S2Pattern
from braid.kernels.triton import load

LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels(device: torch.device):
    return load("attention_kernels", interpret=device.type != "cuda")


def _config(device: torch.device, d: int) -> dict:
    """Tile sizes / launch options. CPU (interpreter): small tiles keep tests fast and exercise
    several tiles per sequence. CUDA: FlashAttention-2-like defaults, not yet tuned on an H100."""
    if device.type != "cuda":
        return dict(fwd=(16, 16, {}), bwd=(16, 16, {}))
    warps = 8 if d > 64 else 4
    return dict(fwd=(128, 64, dict(num_warps=warps, num_stages=3)),
                bwd=(64, 64, dict(num_warps=warps, num_stages=2)))


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())  # tl.dot needs ≥ 16 and powers of two


class _Args:
    """The scalar and constexpr arguments shared by the three kernels."""

    def __init__(self, q, k, v, q_offset, causal, scale, window, sink, q_doc, c_q, s2):
        self.b, self.t, self.hq, self.d = q.shape
        self.s, self.hkv, self.dv = k.shape[1], k.shape[2], v.shape[3]
        hq = self.hq
        self.g = hq // self.hkv
        self.scalars = dict(T=self.t, S=self.s, HQ=hq, G=self.g, q_offset=q_offset,
                            window=window if window is not None else 0, sink=sink)
        if s2 is None:
            self.scalars.update(s2_block=1, s2_local=1, s2_stride=1, s2_step=0, s2_shift=0)
        else:
            step = s2.step(hq)
            self.scalars.update(s2_block=s2.block, s2_local=s2.local_blocks, s2_stride=s2.vert_stride,
                                s2_step=step, s2_shift=s2.head_start * step + s2.offset)
        self.scale = scale
        self.consts = dict(D=self.d, DV=self.dv, BD=_pow2(self.d), BDV=_pow2(self.dv), CAUSAL=causal,
                           HAS_WINDOW=window is not None, HAS_DOC=q_doc is not None, HAS_S2=s2 is not None,
                           HAS_C=c_q is not None, PREC="ieee" if q.dtype == torch.float32 else "tf32")
        self.cfg = _config(q.device, max(self.d, self.dv))


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _forward(a: _Args, q, k, v, c_q, c_k, q_doc, k_doc):
    o = torch.empty(a.b, a.t, a.hq, a.dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(a.b, a.hq, a.t, dtype=torch.float32, device=q.device)
    bm, bn, opts = a.cfg["fwd"]
    grid = (triton_cdiv(a.t, bm), a.b * a.hq)
    _kernels(q.device)._attn_fwd[grid](
        q, k, v, o, lse, c_q, c_k, q_doc, k_doc, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        scale_log2=a.scale * LOG2E, **a.scalars, **a.consts, BM=bm, BN=bn, **opts)
    return o, lse


def _backward(a: _Args, q, k, v, o, lse, c_q, c_k, q_doc, k_doc, d_o, d_lse, want_c: bool):
    # delta_i = Σ_d dO·O (the softmax-Jacobian term); a gradient on lse_i adds p_ij·dlse_i to dS_ij,
    # which is the same as subtracting dlse_i from delta_i.
    delta = (d_o.float() * o.float()).sum(-1).transpose(1, 2)  # [B, Hq, T]
    if d_lse is not None:
        delta = delta - d_lse.float()
    delta = delta.contiguous()
    lse = torch.where(torch.isinf(lse), float("inf"), lse).contiguous()  # masked rows: exp2(s − inf) = 0
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    has_c = want_c and c_q is not None
    dcq = torch.empty_like(c_q) if has_c else None
    dck = torch.empty_like(c_k) if has_c else None
    consts = dict(a.consts, HAS_C=c_q is not None)
    bm, bn, opts = a.cfg["bwd"]
    mod = _kernels(q.device)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(d_o))
    scalars = dict(a.scalars, scale=a.scale, scale_log2=a.scale * LOG2E)
    # dc_k is only written when HAS_C; without want_c it goes to a scratch buffer.
    dck_buf = dck if has_c else (torch.empty_like(c_k) if c_k is not None else None)
    dcq_buf = dcq if has_c else (torch.empty_like(c_q) if c_q is not None else None)
    mod._attn_bwd_dkdv[(triton_cdiv(a.s, bn), a.b * a.hkv)](
        q, k, v, d_o, lse, delta, c_q, c_k, q_doc, k_doc, dk, dv, dck_buf, *common, *_strides(dk), *_strides(dv),
        **scalars, **consts, BM=bm, BN=bn, **opts)
    mod._attn_bwd_dq[(triton_cdiv(a.t, bm), a.b * a.hq)](
        q, k, v, d_o, lse, delta, c_q, c_k, q_doc, k_doc, dq, dcq_buf, *common, *_strides(dq),
        **scalars, **consts, BM=bm, BN=bn, **opts)
    return dq, dk, dv, dcq, dck


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c_q, c_k, q_doc, k_doc, q_offset, causal, scale, window, sink, s2):
        a = _Args(q, k, v, q_offset, causal, scale, window, sink, q_doc, c_q, s2)
        o, lse = _forward(a, q, k, v, c_q, c_k, q_doc, k_doc)
        ctx.save_for_backward(q, k, v, o, lse, c_q, c_k, q_doc, k_doc)
        ctx.args = (q_offset, causal, scale, window, sink, s2)
        return o, lse

    @staticmethod
    def backward(ctx, d_o, d_lse):
        q, k, v, o, lse, c_q, c_k, q_doc, k_doc = ctx.saved_tensors
        a = _Args(q, k, v, *ctx.args[:5], q_doc, c_q, ctx.args[5])
        d_o = torch.zeros_like(o) if d_o is None else d_o.contiguous()
        want_c = c_q is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        dq, dk, dv, dcq, dck = _backward(a, q, k, v, o, lse, c_q, c_k, q_doc, k_doc, d_o, d_lse, want_c)
        return (dq, dk, dv, dcq, dck) + (None,) * 8


def triton_attention(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with ``partial_attention``'s semantics, on Triton kernels.

    Args:
        q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; one dtype among fp16, bf16,
            fp32 (bf16 only on CUDA: the interpreter's bf16 dot is unreliable); under autocast all three
            are cast to the autocast dtype first; any strides with a contiguous last dim (else copied).
        q_offset: query i sits at key position ``q_offset + i``.
        q_doc ``[B, T]`` / k_doc ``[B, S]``: integer document ids (both or neither).
        c_q ``[B, T, Hq]`` / c_k ``[B, S, Hq]``: FoX cumulative log gates (both or neither), computed in
            fp32 (cast here); differentiable.
        causal, scale, window, sink, s2: as in ``partial_attention``.
    Returns:
        o ``[B, T, Hq, Dv]`` in q's dtype and lse ``[B, Hq, T]`` fp32, both differentiable.
    """
    if torch.is_autocast_enabled(q.device.type):  # like SDPA under autocast: run in the autocast dtype
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention(backend='triton'): q/k/v must share one dtype of fp16/bf16/fp32, got "
                         f"{q.dtype}/{k.dtype}/{v.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be ≥ 1 or None, got {window}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if c_q is not None:
        c_q, c_k = c_q.float().contiguous(), c_k.float().contiguous()
    if q_doc is not None:
        q_doc, k_doc = q_doc.long().contiguous(), k_doc.long().contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    return _TritonAttention.apply(q, k, v, c_q, c_k, q_doc, k_doc, int(q_offset), bool(causal), scale, window,
                                  int(sink), s2)


def compile_for_gpu(capability: int = 90, dtype: str = "bf16", d: int = 128, dv: Optional[int] = None,
                    **flags) -> dict[str, dict]:
    """Compile the three kernels ahead of time for ``cuda`` compute capability ``capability`` (no GPU
    needed, see ``triton.aot``), with every option on unless ``flags`` (``CAUSAL``, ``HAS_WINDOW``,
    ``HAS_DOC``, ``HAS_S2``, ``HAS_C``) turn some off. Catches compile errors that the interpreter
    cannot see. Needs a process without ``TRITON_INTERPRET=1``.

    Returns ``{kernel: aot.compile_stats(...)}`` (shared memory and whether it fits, MMAs, spills).
    """
    from braid.kernels.triton.aot import compile_stats

    mod = load("attention_kernels", interpret=False)
    dv = d if dv is None else dv  # value head dim (MLA: 128 values under 192-wide queries and keys)
    consts = dict(D=d, DV=dv, BD=_pow2(d), BDV=_pow2(dv), CAUSAL=True, HAS_WINDOW=True, HAS_DOC=True, HAS_S2=True,
                  HAS_C=True, PREC="ieee" if dtype == "fp32" else "tf32")
    consts.update(flags)
    cfg = _config(torch.device("cuda"), max(d, dv))  # as the launch picks it (only the device type is read)
    (fwd_bm, fwd_bn, fwd_opts), (bwd_bm, bwd_bn, bwd_opts) = cfg["fwd"], cfg["bwd"]

    def arg_type(name: str) -> str:
        if name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV_"):
            return f"*{dtype}"
        if name in ("QD", "KD"):
            return "*i64"
        if name in ("LSE", "DELTA", "CQ", "CK", "DCQ", "DCK"):
            return "*fp32"
        return "fp32" if name.startswith("scale") else "i32"

    kernels = ((mod._attn_fwd, fwd_bm, fwd_bn, fwd_opts), (mod._attn_bwd_dkdv, bwd_bm, bwd_bn, bwd_opts),
               (mod._attn_bwd_dq, bwd_bm, bwd_bn, bwd_opts))
    return {fn.__name__: compile_stats(fn, dict(consts, BM=bm, BN=bn), arg_type, opts, capability)
            for fn, bm, bn, opts in kernels}
