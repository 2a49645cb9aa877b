"""Kimi Delta Attention mixer (letter K): projections, short convolutions, gates around the KDA op.

Packed documents (``seq.doc_ids``): short-conv taps and the delta-rule state do not cross a document
start. With meta tokens each document starts from the meta prefix instead (as Hymba's SSM does): its
first conv taps read the last meta positions and its state starts from the state after the meta
tokens, so a packed document computes exactly what it computes alone behind the meta tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from braid.config import ModelConfig
from braid.kernels import kda
from braid.models.layers import RMSNorm, SeqInfo, mark_output_projection
from braid.models.registry import register_mixer, register_options


@register_options("kda")
@dataclass
class KDAConfig:
    """Kimi Delta Attention (letter K)."""

    n_heads: Optional[int] = None  # default: model.n_heads
    head_dim: Optional[int] = None  # K = V head dim; default: model.d_model // heads
    conv_size: int = 4
    chunk_size: int = 64  # 16 | 32 | 64: the sizes the Triton kernels take and fit in a GPU block
    gate_bias: bool = True  # bias on the output gate's g_b projection; the released Kimi Linear has none


def conv_sources(doc_ids: torch.Tensor, meta_tokens: int, width: int) -> torch.Tensor:
    """Which position feeds each tap of a causal conv over packed documents behind meta tokens.

    doc_ids ``[B, T]`` (the first ``meta_tokens`` positions are the meta prefix) → ``[B, T, width]``
    int64: for tap ``lag`` (lag steps back) at t, t − lag inside t's document (or inside the meta
    prefix), else the meta position the tap reads when the document follows the prefix directly
    (m + offset − lag), else −1 (zero padding). Position ``meta_tokens`` always starts a document,
    so a context-parallel piece ``[meta, halo, segment]`` gets the same taps as the whole sequence.
    """
    t, m = doc_ids.shape[1], meta_tokens
    pos = torch.arange(t, device=doc_ids.device)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    if 0 < m < t:
        start[:, m] = True
    offset = pos - torch.where(start, pos, 0).cummax(dim=1).values  # position inside its document
    lag = torch.arange(width, device=doc_ids.device)
    inside = pos[:, None] - lag  # [T, W]
    before = (torch.where(pos >= m, m, 0) + offset)[..., None] - lag  # [B, T, W], into the meta prefix
    return torch.where(offset[..., None] >= lag, inside, torch.where(before >= 0, before, -1))


class ShortConv(nn.Module):
    """Depthwise causal convolution + SiLU over ``[B, T, C]`` (no bias).

    With ``doc_ids`` a tap that would reach back across a document start reads the meta prefix
    instead (``conv_sources``), or nothing without meta tokens, so packed documents never see each
    other.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        # A Conv1d child keeps the weight layout of the usual checkpoints and its default init.
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, meta_tokens: int = 0) -> torch.Tensor:
        """x ``[B, T, C]`` (any float dtype), doc_ids ``[B, T]`` or None, the number of meta tokens at
        the front of x → ``[B, T, C]`` in x's dtype."""
        w = self.conv.weight[:, 0, :].to(x.dtype)  # [C, ks]; tap ks-1 is the current token
        if doc_ids is None:
            y = F.conv1d(F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0)), w[:, None, :], groups=w.shape[0])
            return F.silu(y.transpose(1, 2))
        src = conv_sources(doc_ids, meta_tokens, self.kernel_size)
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], 1)  # index T reads zeros
        y = x * w[:, -1]
        for lag in range(1, self.kernel_size):
            idx = torch.where(src[..., lag] >= 0, src[..., lag], x.shape[1])
            y = y + padded.gather(1, idx[..., None].expand(-1, -1, x.shape[2])) * w[:, -1 - lag]
        return F.silu(y)


def _up(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or kept in fp64 (so that fp64 tests and gradcheck see fp64 arithmetic)."""
    return x if x.dtype == torch.float64 else x.float()


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(Σ x² + eps)`` over the last dim, computed and returned in fp32 (fp64 stays fp64)."""
    x = _up(x)
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def gated_rms_norm(o: torch.Tensor, norm: RMSNorm, gate_logits: torch.Tensor) -> torch.Tensor:
    """``RMSNorm(o) · w ⊙ sigmoid(gate)`` per head, in fp32 (fp64 stays fp64), returned in o's dtype.

    o, gate_logits ``[..., D]``; ``norm`` supplies the weight ``[D]`` and eps. One fused step (a
    kernel later), and unlike ``RMSNorm.forward`` it keeps fp64 inputs in fp64.
    """
    of = _up(o)
    y = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + norm.eps) * norm.weight.to(of.dtype)
    return (y * torch.sigmoid(_up(gate_logits))).to(o.dtype)


def kda_behind_meta(q, k, v, g, beta, meta_tokens: int, doc_ids: Optional[torch.Tensor], **kw) -> torch.Tensor:
    """``braid.kernels.kda`` over ``[meta, text]`` (zero initial state) where every document of the
    text starts from the state after the meta tokens, as it would alone behind them.

    Shapes as ``kda``; doc_ids ``[B, T]`` (meta: −1) or None; ``kw`` go to ``kda``. Returns o."""
    m = meta_tokens
    if doc_ids is None or m == 0 or m >= k.shape[1]:
        return kda(q, k, v, g, beta, doc_ids=doc_ids, **kw)[0]
    o_meta, s_meta = kda(q[:, :m], k[:, :m], v[:, :m], g[:, :m], beta[:, :m], output_final_state=True, **kw)
    o_text, _ = kda(q[:, m:], k[:, m:], v[:, m:], g[:, m:], beta[:, m:], initial_state=s_meta,
                    restart_state=s_meta, doc_ids=doc_ids[:, m:], **kw)
    return torch.cat([o_meta, o_text], 1)


@register_mixer("K")
class KDA(nn.Module):
    # Declarations (read without importing this module, see braid/models/registry.py).
    cp_ops = ("kda", "local_mix")  # the seq.ops methods forward calls
    s2_capable = False  # applies model.s2 to its attention

    """Kimi Delta Attention: a gated delta-rule linear attention with per-channel decay (Kimi Linear)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads = cfg.kda.n_heads or cfg.n_heads
        self.head_dim = cfg.kda.head_dim or cfg.d_model // self.n_heads
        self.chunk_size = cfg.kda.chunk_size
        self.conv_size = cfg.kda.conv_size
        d, h, hd = cfg.d_model, self.n_heads, self.head_dim
        inner = h * hd
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.q_conv = ShortConv(inner, cfg.kda.conv_size)
        self.k_conv = ShortConv(inner, cfg.kda.conv_size)
        self.v_conv = ShortConv(inner, cfg.kda.conv_size)
        # Decay: low rank d → head_dim → H·K, then −exp(A_log) · softplus(· + dt_bias).
        self.f_a = nn.Linear(d, hd, bias=False)
        self.f_b = nn.Linear(hd, inner, bias=False)
        self.A_log = nn.Parameter(torch.empty(h))
        self.dt_bias = nn.Parameter(torch.empty(inner))
        self.b_proj = nn.Linear(d, h, bias=False)
        # Output gate: low rank d → head_dim → H·V.
        self.g_a = nn.Linear(d, hd, bias=False)
        self.g_b = nn.Linear(hd, inner, bias=cfg.kda.gate_bias)
        self.o_norm = RMSNorm(hd, cfg.norm_eps)
        self.o_proj = mark_output_projection(nn.Linear(inner, d, bias=False))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decay parameters as in Kimi Linear / Mamba; both are excluded from weight decay.

        ``A_log = log U(1, 16)`` per head; ``dt_bias = softplus⁻¹(dt)`` with
        ``dt = exp U(ln 1e-3, ln 0.1)`` clamped ≥ 1e-4, per key channel.
        """
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        lo, hi = math.log(1e-3), math.log(0.1)
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(lo, hi)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # Decay rates are not weights: shrinking them towards 0 would change the memory horizon.
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        """x ``[B, T, d]`` → ``[B, T, d]`` in x's dtype; ``seq.doc_ids`` (if any) isolates documents."""
        b, t, _ = x.shape
        h, hd = self.n_heads, self.head_dim
        doc, m = seq.doc_ids, seq.meta_tokens
        convs = lambda q, k, v, d: (self.q_conv(q, d, m), self.k_conv(k, d, m), self.v_conv(v, d, m))  # noqa: E731
        qkv = (self.q_proj(x), self.k_proj(x), self.v_proj(x), doc)
        if seq.cp is None:
            q, k, v = convs(*qkv)
        else:  # each rank's segments need the conv_size − 1 tokens before them
            q, k, v = seq.cp.local_mix(convs, self.conv_size - 1, *qkv)
        q = l2_normalize(q.view(b, t, h, hd))
        k = l2_normalize(k.view(b, t, h, hd))
        v = v.view(b, t, h, hd)
        # Gates in fp32: g is a log decay summed over a chunk, β scales the delta-rule step.
        f = _up(self.f_b(self.f_a(x))).view(b, t, h, hd) + _up(self.dt_bias).view(h, hd)
        g = -torch.exp(_up(self.A_log))[:, None] * F.softplus(f)
        beta = torch.sigmoid(_up(self.b_proj(x)))
        if seq.cp is None:
            o = kda_behind_meta(q, k, v, g, beta, m, doc, chunk_size=self.chunk_size)
        else:
            o = seq.cp.kda(q, k, v, g, beta, chunk_size=self.chunk_size, doc_ids=doc)
        o = gated_rms_norm(o, self.o_norm, self.g_b(self.g_a(x)).view(b, t, h, hd))
        return self.o_proj(o.reshape(b, t, h * hd))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token: projections, short convs and the chunked KDA algorithm.

        The chunked part counts the causal (lower-triangular) work of a chunk of C = min(chunk,
        seq_len) tokens per head: scores βKKᵀ and QKᵀ, the triangular solve for [w | u], the intra
        output P·v', and three K×V products with the state (w·S, q·S, the state update).
        """
        d, h, hd = self.q_proj.in_features, self.n_heads, self.head_dim
        inner = h * hd
        proj = 2 * d * inner * 4  # q, k, v, o
        proj += 2 * 2 * (d * hd + hd * inner)  # f_a/f_b and g_a/g_b
        proj += 2 * d * h  # b_proj
        conv = 2 * 3 * inner * self.conv_size
        c = min(self.chunk_size, seq_len)
        lower, strict = c * (c + 1) / 2, c * (c - 1) / 2  # pairs j ≤ i and j < i in a chunk
        per_chunk = 2 * hd * (strict + lower)  # A and P
        per_chunk += 2 * strict * 2 * hd  # forward substitution, K + V right-hand columns
        per_chunk += 2 * lower * hd  # P · v'
        per_chunk += 3 * 2 * c * hd * hd  # w S, q S, Kᵀ v'
        return proj + conv + h * per_chunk / c
