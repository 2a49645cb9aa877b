"""Hymba hybrid-head mixer (letter H, Dong et al.): attention heads and a Mamba-1 SSM in parallel.

One ``in_proj`` makes, per token, ``[q | k | v | x | z]``: queries (H · Dqk), keys (Hkv · Dqk) and
values (Hkv · Dv) for GQA attention (RoPE per ``model.pos_emb``, optional QK-norm, the layer's
window, meta tokens as sinks, documents), and the SSM input x and gate z (``ssm_inner`` each).

SSM (Mamba-1): ``x ← silu(depthwise causal conv(x))``; ``x_proj(x) = [dt | B | C]`` (dt_rank,
d_state, d_state), each RMS-normalised with a learned weight, as in the released Hymba code
(``mamba_inner_layernorms``; reference.md's "dt, B, C RMS-normalised"); ``dt = softplus(dt_proj(dt))``;
``A = −exp(A_log)``; ``y = selective_scan(x, dt, A, B, C, D) · silu(z)``.

Fusion: ``out_proj((RMSNorm₁(attn) + RMSNorm₂(ssm)) / 2)``, so H · Dv must equal ``ssm_inner``.

Cross-layer KV sharing (``hymba.kv_share_groups``): the first layer of a group stores its post-RoPE
K/V in ``seq.shared[layer_idx]``; the others build no k/v columns and attend with those.

Packed documents (``seq.doc_ids``): attention stays in its document; conv taps and the SSM state do
not cross a document start. With meta tokens, each document starts from the meta prefix instead:
its first conv taps read the last meta positions and its SSM state starts from the state after the
meta tokens, so a packed document computes exactly what it would alone behind the meta tokens.

Cached decoding (``forward(x, seq, cache)`` with a ``HymbaCache``): K/V as for attention (a layer
reusing another layer's K/V reads that layer's cache, found in ``seq.shared`` as in training), the
last ``d_conv − 1`` SSM inputs and the SSM state ``[B, C, N]`` (fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from braid.config import ModelConfig
from braid.kernels import selective_scan
from braid.kernels.precision import compute_dtype
from braid.kernels.ssm import selective_state_step
from braid.models.caches import KVCache, conv_continued
from braid.models.doc_boundaries import conv_sources, document_starts
from braid.models.layers import RMSNorm, Rotary, SeqInfo, layer_window, mark_output_projection, model_norm
from braid.models.registry import register_mixer, register_options
from braid.models.tp_plan import Heads, Rows, Split, TPPlan
from braid.models.visible_keys import mean_visible_keys


@register_options("hymba")
@dataclass
class HymbaConfig:
    """Hymba hybrid heads (letter H): attention heads (model.n_heads/n_kv_heads/head_dim) + Mamba-1 SSM."""

    v_head_dim: Optional[int] = None  # default: ssm_inner // n_heads (the branches are summed)
    ssm_inner: Optional[int] = None  # SSM channels; default: 2 · d_model
    d_state: int = 16
    d_conv: int = 4
    dt_rank: Optional[int] = None  # default: ceil(d_model / 16)
    # Cross-layer KV sharing: in each group the first layer computes K/V, the others reuse them.
    kv_share_groups: List[List[int]] = field(default_factory=list)

    def check(self, m, layers: list, require) -> None:
        """The checks involving other model keys; ``layers``: the indices of the H layers."""
        inner = self.ssm_inner or 2 * m.d_model
        v_dim = self.v_head_dim or inner // m.n_heads
        require(m.n_heads * v_dim == inner, "model.hymba.v_head_dim",
                f"model.n_heads × v_head_dim must equal model.hymba.ssm_inner = {inner}", self.v_head_dim)
        seen: set = set()
        for group in self.kv_share_groups:
            ok = len(group) >= 1 and all(i in layers for i in group) and list(group) == sorted(group) \
                and not seen & set(group)
            require(ok, "model.hymba.kv_share_groups", "disjoint, ascending lists of indices of H layers",
                    self.kv_share_groups)
            seen |= set(group)

# Mamba's dt initialisation range: dt ~ logUniform(DT_MIN, DT_MAX), floored at DT_FLOOR.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
# FLOPs per (channel, state) per token of the selective scan (discretisation, update, readout),
# the convention of Mamba's own FLOP estimate.
SCAN_FLOPS_PER_STATE = 9


def _kv_producer(cfg: ModelConfig, layer_idx: int) -> Optional[int]:
    """The layer whose K/V layer ``layer_idx`` reuses (None: it computes its own), validated."""
    groups = [g for g in cfg.hymba.kv_share_groups if layer_idx in g]
    if not groups:
        return None
    if len(groups) > 1:
        raise ValueError(f"model.hymba.kv_share_groups: layer {layer_idx} is in more than one group")
    group = list(groups[0])
    if group != sorted(set(group)) or group[-1] >= len(cfg.pattern):
        raise ValueError(f"model.hymba.kv_share_groups: group {group} must list distinct layers in "
                         f"increasing order, below {len(cfg.pattern)}")
    if cfg.pattern[group[0]] != "H":
        raise ValueError(f"model.hymba.kv_share_groups: group {group} starts at layer {group[0]}, "
                         f"which is '{cfg.pattern[group[0]]}', not a Hymba layer")
    return None if group[0] == layer_idx else group[0]


class HymbaCache(KVCache):
    """A Hymba layer's decoding cache: its K/V (``KVCache``; empty for a layer reusing another's), the
    SSM conv's input tail ``[B, d_conv − 1, C]`` and the SSM state ``[B, C, N]`` (None at first)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.conv: Optional[torch.Tensor] = None
        self.ssm: Optional[torch.Tensor] = None


@register_mixer("H")
class Hymba(nn.Module):
    # Declarations (read without importing this module, see braid/models/registry.py).
    cp_ops = ("attention", "local_mix", "selective_scan")  # the seq.ops methods forward calls
    s2_capable = False  # applies model.s2 to its attention

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        h = cfg.hymba
        d = cfg.d_model
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or d // cfg.n_heads
        self.ssm_inner = h.ssm_inner or 2 * d
        self.v_head_dim = h.v_head_dim or self.ssm_inner // self.n_heads
        self.d_state, self.d_conv = h.d_state, h.d_conv
        self.dt_rank = h.dt_rank or math.ceil(d / 16)
        self.window = layer_window(cfg, layer_idx)
        self.sink_default = cfg.meta_tokens  # for flops only; forward uses seq.meta_tokens
        if self.n_heads * self.v_head_dim != self.ssm_inner:
            raise ValueError(
                f"Hymba layer {layer_idx}: attention output channels model.n_heads × model.hymba.v_head_dim "
                f"= {self.n_heads} × {self.v_head_dim} = {self.n_heads * self.v_head_dim} must equal "
                f"model.hymba.ssm_inner = {self.ssm_inner} (the two branches are summed); e.g. set "
                f"model.hymba.v_head_dim = {self.ssm_inner / self.n_heads:g}")
        self.kv_source = _kv_producer(cfg, layer_idx)
        self.stores_kv = self.kv_source is None and any(layer_idx in g for g in h.kv_share_groups)
        own_kv = self.kv_source is None

        self.q_dim = self.n_heads * self.head_dim
        self.k_dim = self.n_kv_heads * self.head_dim if own_kv else 0
        self.v_dim = self.n_kv_heads * self.v_head_dim if own_kv else 0
        self.in_proj = nn.Linear(d, self.q_dim + self.k_dim + self.v_dim + 2 * self.ssm_inner, bias=False)
        self.q_norm = model_norm(cfg, self.head_dim) if cfg.qk_norm else None
        self.k_norm = model_norm(cfg, self.head_dim) if cfg.qk_norm and own_kv else None
        self.rotary = Rotary(self.head_dim, cfg.rope_theta, cfg.rotary_percent) if cfg.pos_emb == "rope" else None

        inner, n = self.ssm_inner, self.d_state
        self.conv1d = nn.Conv1d(inner, inner, self.d_conv, groups=inner, padding=self.d_conv - 1, bias=True)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * n, bias=False)
        self.dt_layernorm = RMSNorm(self.dt_rank, cfg.norm_eps)
        self.B_layernorm = RMSNorm(n, cfg.norm_eps)
        self.C_layernorm = RMSNorm(n, cfg.norm_eps)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, n))
        self.D = nn.Parameter(torch.empty(inner))
        self.pre_avg_layernorm1 = RMSNorm(inner, cfg.norm_eps)  # attention branch
        self.pre_avg_layernorm2 = RMSNorm(inner, cfg.norm_eps)  # SSM branch
        self.out_proj = mark_output_projection(nn.Linear(inner, d, bias=False))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's SSM init: A = −(1..d_state) per channel, D = 1, dt_proj bias = softplus⁻¹(dt) with
        dt ~ logU(1e-3, 0.1), dt_proj weight ~ U(±dt_rank^-½). Runs after HybridLM's generic init."""
        dev = self.A_log.device
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=dev)
        self.A_log.copy_(torch.log(a).expand_as(self.A_log))
        self.D.fill_(1.0)
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        u = torch.rand(self.ssm_inner, device=dev)
        dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt), stable for small dt
        # Decay rates and skips are not weights to shrink. Marked here rather than in __init__ so
        # that parameters re-created when a meta-device model is materialised get it back too.
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True

    # ------------------------------------------------------------------ attention branch

    def heads(self, q, k, v, seq: SeqInfo):
        """Projections ``[B,T,H·D]`` → per-head q (QK-norm, RoPE) and, for a layer with its own K/V,
        per-head k (likewise) and v; a layer that reuses another's K/V gets ``k = v = None``.
        Shared by training and cached decoding, which must agree exactly."""
        b, t, _ = q.shape
        q = q.view(b, t, -1, self.head_dim)  # local heads under tp
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rotary is not None:
            q = self.rotary(q, seq.position_ids)
        if self.kv_source is not None:
            return q, None, None
        k = k.view(b, t, -1, self.head_dim)
        v = v.view(b, t, -1, self.v_head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.rotary is not None:
            k = self.rotary(k, seq.position_ids)
        return q, k, v

    def _attention(self, q, k, v, seq: SeqInfo, cache: Optional["HymbaCache"] = None) -> torch.Tensor:
        """q ``[B,T,Hq·Dqk]``, k/v of this layer or None → attention output ``[B, T, H·Dv]``; with
        ``cache`` (decoding) over the cached keys too. What a group's first layer shares in
        ``seq.shared`` is its k/v, or in decoding its cache."""
        b, t, _ = q.shape
        q, k, v = self.heads(q, k, v, seq)
        if self.kv_source is None:
            if self.stores_kv:
                seq.shared[self.layer_idx] = (k, v) if cache is None else cache
        elif self.kv_source not in seq.shared:
            raise RuntimeError(f"Hymba layer {self.layer_idx} reuses the K/V of layer {self.kv_source}, "
                               "which has not run in this forward pass")
        if cache is None:
            if self.kv_source is not None:
                k, v = seq.shared[self.kv_source]
            o = seq.ops.attention(q, k, v, causal=True, window=self.window, sink=seq.meta_tokens,
                                  doc_ids=seq.doc_ids)
        elif self.kv_source is None:
            # A shared cache must serve its readers' windows: only an unshared one is trimmed.
            o = cache.attend(q, k, v, window=self.window, sink=seq.meta_tokens, trim=not self.stores_kv)
        else:
            o = seq.shared[self.kv_source].attend(q, None, None, window=self.window, sink=seq.meta_tokens,
                                                  store=False, trim=False)
        return o.reshape(b, t, -1)

    # ------------------------------------------------------------------ SSM branch

    def _doc_layout(self, seq: SeqInfo, t: int):
        """For packed documents: ``(reset [B,T] bool, conv source index [B,T,K])``, else (None, None):
        the document starts and each conv tap's source (``braid.models.doc_boundaries``)."""
        if seq.doc_ids is None:
            return None, None
        reset = document_starts(seq.doc_ids, seq.meta_tokens)
        return reset, conv_sources(seq.doc_ids, seq.meta_tokens, self.d_conv, reset)

    def _conv(self, x: torch.Tensor, src: Optional[torch.Tensor]) -> torch.Tensor:
        """Depthwise causal conv over time, x ``[B, T, C]`` → ``[B, T, C]``; taps from ``src`` if given."""
        t = x.shape[1]
        if src is None:
            y = F.conv1d(x.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                         padding=self.d_conv - 1, groups=x.shape[-1])
            return y[..., :t].transpose(1, 2)
        w = self.conv1d.weight[:, 0, :].to(x.dtype)  # [C, K]; w[:, K−1−k] multiplies x_{t−k}
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], 1)  # index t = zero
        y = self.conv1d.bias.to(x.dtype).expand_as(x)
        for k in range(self.d_conv):
            idx = torch.where(src[:, :, k] >= 0, src[:, :, k], t)
            tap = padded.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))
            y = y + tap * w[:, self.d_conv - 1 - k]
        return y

    def ssm(self, x: torch.Tensor, z: torch.Tensor, seq: SeqInfo, cache: Optional["HymbaCache"] = None) -> torch.Tensor:
        """The Mamba-1 branch: SSM input x and gate z ``[B, T, ssm_inner]`` → ``[B, T, ssm_inner]``;
        with ``cache`` (decoding, one document) continued from the cached conv inputs and state."""
        m = seq.meta_tokens

        def conv(xp, dp):  # taps reach d_conv − 1 tokens back (across context-parallel segments too)
            return self._conv(xp, None if dp is None else conv_sources(dp, m, self.d_conv))

        if cache is None:
            x = F.silu(seq.ops.local_mix(conv, self.d_conv - 1, x, seq.doc_ids))
        else:
            x, cache.conv = conv_continued(cache.conv, x, self.d_conv, lambda u: self._conv(u, None))
            x = F.silu(x)
        dt, b_in, c_out = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt, b_in, c_out = self.dt_layernorm(dt), self.B_layernorm(b_in), self.C_layernorm(c_out)
        acc = compute_dtype(x)
        # The bias is added in fp32: softplus of a bf16-rounded bias (≈ −5) would move dt by ~2 %.
        dt = F.softplus(F.linear(dt, self.dt_proj.weight).to(acc) + self.dt_proj.bias.to(acc))
        A = -torch.exp(self.A_log.to(acc))
        if cache is None:  # documents after meta tokens restart from the state the meta prefix leaves
            return seq.ops.selective_scan(x, dt, A, b_in, c_out, self.D, z, doc_ids=seq.doc_ids)
        if x.shape[1] > 1:
            y, cache.ssm = selective_scan(x, dt, A, b_in, c_out, self.D, z, initial_state=cache.ssm,
                                          output_final_state=True)
            return y
        state = cache.ssm
        if state is None:
            state = torch.zeros(x.shape[0], x.shape[-1], self.d_state, dtype=acc, device=x.device)
        y, cache.ssm = selective_state_step(state, x[:, 0], dt[:, 0], A, b_in[:, 0], c_out[:, 0], self.D, z[:, 0])
        return y[:, None]

    # ------------------------------------------------------------------ the mixer

    def new_cache(self, stream) -> "HymbaCache":
        return HymbaCache(stream)

    def forward(self, x: torch.Tensor, seq: SeqInfo, cache: Optional["HymbaCache"] = None) -> torch.Tensor:
        """x ``[B, T, d]`` → ``[B, T, d]`` (same dtype); ``cache``: decoding (see the module docstring)."""
        # Local sizes under tp, from shapes: SSM channels (D), heads (ssm_inner = H · Dv) and the
        # rest of in_proj's output, k then v per KV head.
        inner = self.D.shape[0]
        y = self.in_proj(x)
        q_dim = inner // self.v_head_dim * self.head_dim
        kv = y.shape[-1] - q_dim - 2 * inner
        k_dim = kv // (self.head_dim + self.v_head_dim) * self.head_dim
        q, k, v, xs, z = y.split([q_dim, k_dim, kv - k_dim, inner, inner], dim=-1)
        attn = self._attention(q, k, v, seq, cache)
        ssm = self.ssm(xs, z, seq, cache)
        return self.out_proj((self.pre_avg_layernorm1(attn) + self.pre_avg_layernorm2(ssm)) / 2)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: projections, the conv, the scan (9 per channel·state) and attention
        scores/values over the mean visible keys (window and meta-token sinks included)."""
        proj = sum(mod.weight.numel() for mod in self.modules() if isinstance(mod, nn.Linear))
        conv = self.ssm_inner * self.d_conv
        scan = SCAN_FLOPS_PER_STATE * self.ssm_inner * self.d_state
        visible = mean_visible_keys(seq_len, self.window, self.sink_default)
        attn = 2 * self.n_heads * (self.head_dim + self.v_head_dim) * visible
        return 2 * (proj + conv) + scan + attn

    def tp_plan(self, tp: int) -> TPPlan:
        """Attention heads and SSM channels split together (rank r's attention output channels are
        its SSM channels, so the fusion stays local).

        ``in_proj`` packs ``[q | k | v | x | z]``: a plain ``Shard(0)`` whose output one all-to-all
        re-lays so that each rank gets its 1/p of every block (of k and v its KV heads' columns, or
        with tp a multiple of n_kv_heads the whole KV head r // (tp / n_kv_heads); a layer reusing
        another's K/V lays its heads out alike). The depthwise conv, ``dt_proj``, ``A_log``, ``D``
        and the fusion norms follow their channels; ``x_proj`` mixes all channels into dt/B/C: split
        by input columns, its partial sums all-reduced forward (the total feeds every channel) and
        backward (each rank's gradient of the total covers its channels only); the dt/B/C norms and
        QK-norms replicate; the fusion norms' statistic is all-reduced.
        """
        own_kv = self.kv_source is None
        in_proj = Rows((Heads(self.n_heads, self.head_dim, "model.n_heads"),
                        Heads(self.n_kv_heads, self.head_dim if own_kv else 0, "model.n_kv_heads", shared=True),
                        Heads(self.n_kv_heads, self.v_head_dim if own_kv else 0, "model.n_kv_heads", shared=True),
                        Heads(self.ssm_inner, 1, "model.hymba.ssm_inner"),
                        Heads(self.ssm_inner, 1, "model.hymba.ssm_inner")),
                       packed_output=True, key="model.n_kv_heads (Hymba's in_proj rows: q + k + v + 2·ssm_inner)")
        params = {name: Split(0) for name in (
            "conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
            "pre_avg_layernorm1.weight", "pre_avg_layernorm2.weight")}
        params.update({"in_proj.weight": in_proj, "x_proj.weight": Split(1), "out_proj.weight": Split(1)})
        return TPPlan(params=params, reduce_outputs=("x_proj",),
                      split_norms={"pre_avg_layernorm1": self.ssm_inner, "pre_avg_layernorm2": self.ssm_inner})
