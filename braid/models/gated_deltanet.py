"""Gated DeltaNet mixer (letter D; Yang et al. 2025, the linear-attention layer of Qwen3-Next).

Per value head, with a state ``S ∈ R^{K×V}`` and a scalar log decay ``g_t ≤ 0``:

    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ (q_t / √K)

This is KDA with one decay per head instead of one per key channel (a scalar commutes with
``I − β k kᵀ``), so the layer runs braid's KDA op with its gate broadcast over the key channels:
the same chunked / Triton kernels, context-parallel state passing and decoding step serve both.

Layout as Qwen3-Next's ``Qwen3NextGatedDeltaNet`` (so checkpoints map one to one): ``in_proj_qkvz``
gives, per key head, ``[q (Dk) | k (Dk) | v (r·Dv) | z (r·Dv)]`` and ``in_proj_ba`` ``[b (r) | a (r)]``,
where ``r = n_v_heads / n_k_heads`` value heads share each q/k head (repeated before the op). A short
causal conv + SiLU runs over q, k and v (three depthwise convs: their channels are the stock model's
one conv over ``q | k | v``), q and k are L2-normalised, ``β = sigmoid(b)``,
``g = −exp(A_log) · softplus(a + dt_bias)``, and the output is ``RMSNorm(o) · w ⊙ SiLU(z)`` per head,
then ``out_proj``. Grouping per key head keeps every tensor-parallel rank's rows contiguous.

Packed documents, meta tokens and cached decoding (``KDACache``) behave as in the KDA mixer.
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
from braid.kernels.kda import kda_recurrent_step
from braid.kernels.precision import at_least_fp32
from braid.models.caches import conv_continued
from braid.models.kda import KDACache, ShortConv, l2_normalize
from braid.models.layers import RMSNorm, SeqInfo, mark_output_projection
from braid.models.registry import register_mixer, register_options
from braid.models.tp_plan import Split, TPPlan


@register_options("gdn")
@dataclass
class GatedDeltaNetConfig:
    """Gated DeltaNet (letter D)."""

    n_k_heads: Optional[int] = None  # q/k heads; default: model.n_heads
    n_v_heads: Optional[int] = None  # value heads, a multiple of n_k_heads; default: n_k_heads
    head_k_dim: Optional[int] = None  # default: model.d_model // n_k_heads
    head_v_dim: Optional[int] = None  # default: head_k_dim
    conv_size: int = 4
    chunk_size: int = 64  # 16 | 32 | 64: the sizes the Triton KDA kernels take

    def check(self, m, layers: list, require) -> None:
        """The checks involving other model keys; ``layers``: the indices of the D layers."""
        hk = self.n_k_heads or m.n_heads
        hv = self.n_v_heads or hk
        require(hv % hk == 0, "model.gdn.n_v_heads", f"must be a multiple of model.gdn.n_k_heads = {hk}",
                self.n_v_heads)
        require(self.head_k_dim is not None or m.d_model // hk > 0, "model.gdn.head_k_dim",
                f"model.d_model // n_k_heads is 0 (d_model {m.d_model}, {hk} heads): set it", self.head_k_dim)


def gated_rms_norm_silu(o: torch.Tensor, norm: RMSNorm, gate: torch.Tensor) -> torch.Tensor:
    """``RMSNorm(o) · w ⊙ SiLU(gate)`` per head (norm before gate), in fp32 (fp64 stays fp64), returned
    in o's dtype; o, gate ``[..., D]``, ``norm`` supplies the weight ``[D]`` and eps."""
    of = at_least_fp32(o)
    y = of * torch.rsqrt(of.square().mean(-1, keepdim=True) + norm.eps) * norm.weight.to(of.dtype)
    return (y * F.silu(at_least_fp32(gate))).to(o.dtype)


# Mamba-2's decay initialisation: A ~ U(1, 16), dt ~ logU(1e-3, 0.1) floored at 1e-4.
A_RANGE = (1.0, 16.0)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4


@register_mixer("D")
class GatedDeltaNet(nn.Module):
    """Gated DeltaNet: the delta rule with a scalar per-head decay, in Qwen3-Next's layer layout."""

    # Declarations (read without importing this module, see braid/models/registry.py).
    cp_ops = ("kda", "local_mix")  # the seq.ops methods forward calls
    s2_capable = False  # applies model.s2 to its attention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        o = cfg.gdn
        self.n_k_heads = o.n_k_heads or cfg.n_heads
        self.n_v_heads = o.n_v_heads or self.n_k_heads
        self.head_k_dim = o.head_k_dim or cfg.d_model // self.n_k_heads
        self.head_v_dim = o.head_v_dim or self.head_k_dim
        self.chunk_size, self.conv_size = o.chunk_size, o.conv_size
        self.group = self.n_v_heads // self.n_k_heads  # value heads per q/k head
        d, hk, hv, dk, dv = cfg.d_model, self.n_k_heads, self.n_v_heads, self.head_k_dim, self.head_v_dim
        self.in_proj_qkvz = nn.Linear(d, 2 * hk * dk + 2 * hv * dv, bias=False)
        self.in_proj_ba = nn.Linear(d, 2 * hv, bias=False)
        self.q_conv = ShortConv(hk * dk, o.conv_size)
        self.k_conv = ShortConv(hk * dk, o.conv_size)
        self.v_conv = ShortConv(hv * dv, o.conv_size)
        self.A_log = nn.Parameter(torch.empty(hv))
        self.dt_bias = nn.Parameter(torch.empty(hv))
        self.norm = RMSNorm(dv, cfg.norm_eps)
        self.out_proj = mark_output_projection(nn.Linear(hv * dv, d, bias=False))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decay parameters as Mamba-2 / Gated DeltaNet draw them, per value head, both excluded from
        weight decay: ``A_log = log U(1, 16)``; ``dt_bias = softplus⁻¹(dt)``, ``dt = exp U(ln 1e-3,
        ln 0.1)`` clamped ≥ 1e-4. Writes only these two parameters (``empty_like``: any device, the
        full-size view tensor parallelism registers)."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*A_RANGE).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(DT_MIN), math.log(DT_MAX)))
        dt = dt.clamp(min=DT_FLOOR)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # Decay rates are not weights: shrinking them towards 0 would change the memory horizon.
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def new_cache(self, stream) -> KDACache:
        return KDACache()

    def forward(self, x: torch.Tensor, seq: SeqInfo, cache: Optional[KDACache] = None) -> torch.Tensor:
        """x ``[B, T, d]`` → ``[B, T, d]`` in x's dtype; ``seq.doc_ids`` (if any) isolates documents;
        ``cache``: decoding, continued from the cached conv inputs and state."""
        b, t, _ = x.shape
        r, dk, dv = self.group, self.head_k_dim, self.head_v_dim
        hv = self.A_log.shape[0]  # local heads under tp
        hk = hv // r
        q, k, v, z = self.in_proj_qkvz(x).view(b, t, hk, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], -1)
        beta_logit, a = self.in_proj_ba(x).view(b, t, hk, 2 * r).split([r, r], -1)
        q, k, v = q.reshape(b, t, hk * dk), k.reshape(b, t, hk * dk), v.reshape(b, t, hv * dv)
        doc, m = seq.doc_ids, seq.meta_tokens
        if cache is None:
            convs = lambda q, k, v, d: (self.q_conv(q, d, m), self.k_conv(k, d, m), self.v_conv(v, d, m))  # noqa: E731
            q, k, v = seq.ops.local_mix(convs, self.conv_size - 1, q, k, v, doc)  # taps reach conv_size − 1 back
        else:
            ks = self.conv_size
            q, cache.q_conv = conv_continued(cache.q_conv, q, ks, self.q_conv)
            k, cache.k_conv = conv_continued(cache.k_conv, k, ks, self.k_conv)
            v, cache.v_conv = conv_continued(cache.v_conv, v, ks, self.v_conv)
        q = l2_normalize(q.view(b, t, hk, dk)).repeat_interleave(r, dim=2)  # each q/k head serves r v heads
        k = l2_normalize(k.view(b, t, hk, dk)).repeat_interleave(r, dim=2)
        v = v.view(b, t, hv, dv)
        # Gates in fp32: g is a log decay summed over a chunk, β scales the delta-rule step.
        g = -torch.exp(at_least_fp32(self.A_log)) * F.softplus(at_least_fp32(a.reshape(b, t, hv)) +
                                                               at_least_fp32(self.dt_bias))
        g = g[..., None].expand(b, t, hv, dk)  # the KDA op's per-channel layout, without a copy
        beta = torch.sigmoid(at_least_fp32(beta_logit.reshape(b, t, hv)))
        if cache is None:
            o = seq.ops.kda(q, k, v, g, beta, chunk_size=self.chunk_size, doc_ids=doc)
        elif t == 1:
            o, cache.state = kda_recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.state)
            o = o[:, None]
        else:
            o, cache.state = kda(q, k, v, g, beta, chunk_size=self.chunk_size, initial_state=cache.state,
                                 output_final_state=True)
        o = gated_rms_norm_silu(o, self.norm, z.reshape(b, t, hv, dv))
        return self.out_proj(o.reshape(b, t, hv * dv))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token: projections, short convs and the chunked delta rule.

        The chunked part counts, per value head, the causal work of a chunk of C = min(chunk, seq_len)
        tokens as KDA's does with key width K and value width V: scores βKKᵀ and QKᵀ, the triangular
        solve for [w | u], the intra output P·v', and three K×V products with the state.
        """
        d = self.in_proj_qkvz.in_features
        hk, hv, dk, dv = self.n_k_heads, self.n_v_heads, self.head_k_dim, self.head_v_dim
        proj = 2 * d * (self.in_proj_qkvz.out_features + self.in_proj_ba.out_features + hv * dv)
        conv = 2 * (2 * hk * dk + hv * dv) * self.conv_size
        c = min(self.chunk_size, seq_len)
        lower, strict = c * (c + 1) / 2, c * (c - 1) / 2  # pairs j ≤ i and j < i in a chunk
        per_chunk = 2 * dk * (strict + lower)  # A and P
        per_chunk += 2 * strict * (dk + dv)  # forward substitution, K + V right-hand columns
        per_chunk += 2 * lower * dv  # P · v'
        per_chunk += 3 * 2 * c * dk * dv  # w S, q S, Kᵀ v'
        return proj + conv + hv * per_chunk / c

    def tp_plan(self, tp: int) -> TPPlan:
        """Key-head groups split: ``in_proj_qkvz`` and ``in_proj_ba`` are laid out per key head, so an
        even row split gives each rank whole groups (its q/k heads with their value heads); the convs,
        ``A_log`` and ``dt_bias`` follow their heads; the output norm's weight (shared by heads)
        replicates."""
        names = ["in_proj_qkvz.weight", "in_proj_ba.weight", "q_conv.conv.weight", "k_conv.conv.weight",
                 "v_conv.conv.weight", "A_log", "dt_bias"]
        params = {name: Split(0) for name in names}
        params["out_proj.weight"] = Split(1)
        return TPPlan(params=params, checks=((self.n_k_heads, "model.gdn.n_k_heads"),))
