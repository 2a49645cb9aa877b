"""Incremental decoding of a HybridLM: KV caches and recurrent states, one forward per new chunk.

``decode_step(model, input_ids [B, T], cache)`` runs only the new tokens and returns their logits
``[B, T, V]``, equal (up to rounding) to the last T rows of a full forward over everything seen so
far. The first call is the prefill (it prepends the meta tokens); later calls may pass one token or
several. Per mixer, the cache holds (``DecodeCache.layers[layer_idx]``, a dict):

* A / G / F: post-norm, post-RoPE K and V ``[B, S, Hkv, D]`` (a windowed layer keeps only the meta
  sinks and its last ``window`` keys: older ones can never be seen again); FoX also the log forget
  gates ``[B, S, H]`` of the cached keys and, with ``kv_shift``, the last pre-shift k/v.
* M (MLA): the per-head K and V (the latent-only cache is an optimisation for later).
* K (KDA): the last ``conv_size − 1`` inputs of each short conv and the delta-rule state
  ``[B, H, K, V]`` fp32.
* H (Hymba): K/V as for attention (layers reusing another layer's K/V read that layer's cache),
  the last ``d_conv − 1`` SSM inputs and the SSM state ``[B, C, N]`` fp32.

Everything is built from the mixers' own projections, norms and the ops of ``braid.kernels``, so
it computes what ``forward`` computes. Padding and packed documents are not supported (one
sequence per row, all rows the same length).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from braid.kernels import attention, kda, selective_scan
from braid.kernels.kda import kda_recurrent_step
from braid.kernels.precision import at_least_fp32
from braid.kernels.ssm import selective_state_step
from braid.models.attention import Attention
from braid.models.connections import expand_streams, merge_streams
from braid.models.fox import FoX, shift_mix
from braid.models.gated_attention import GatedAttention
from braid.models.hymba import Hymba
from braid.models.kda import KDA, gated_rms_norm, l2_normalize
from braid.models.layers import SeqInfo
from braid.models.mla import MLA


@dataclass
class DecodeCache:
    """What incremental decoding keeps between calls. ``length``: stream positions processed so far
    (meta tokens included); ``layers``: per-layer state (see the module docstring); ``attend``: when
    set, replaces :func:`cached_attention`'s body (same arguments), e.g. a KV cache sharded over ranks
    (``braid.parallel.context.tree_decode``)."""

    length: int = 0
    layers: dict = field(default_factory=dict)
    attend: Optional[Callable] = None


SUPPORTED = (FoX, GatedAttention, Attention, MLA, KDA, Hymba)


def supports_incremental(model: torch.nn.Module) -> bool:
    """True when every mixer of ``model`` has a decoding step here (else generation runs full forwards).

    Not covered yet: unknown mixer classes and the S2 block-sparse pattern (``model.s2.enabled``).
    """
    return all(type(layer.mixer) in SUPPORTED and getattr(layer.mixer, "s2", None) is None
               for layer in model.layers)


def _append(st: dict, key: str, new: torch.Tensor) -> torch.Tensor:
    st[key] = new if key not in st else torch.cat([st[key], new], dim=1)
    return st[key]


def _trim(st: dict, keys: tuple[str, ...], window: Optional[int], sink: int) -> None:
    """Drop keys no future query can see: all but the ``sink`` first and the ``window`` last.

    The kept keys stay contiguous up to the newest, so index distances (window test, FoX forget sums)
    equal the true ones, and the oldest kept non-sink key is already ``window`` away from any new query.
    """
    if window is None:
        return
    for key in keys:
        if key in st and st[key].shape[1] > sink + window:
            t = st[key]
            st[key] = torch.cat([t[:, :sink], t[:, -window:]], dim=1)


def _shift_with_history(st: dict, key: str, raw: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """FoX's kv shift continued across calls: the previous call's last raw k (or v) is x_{t−1}."""
    prev = st.get(key, torch.zeros_like(raw[:, :1]))
    st[key] = raw[:, -1:]
    full = shift_mix(torch.cat([prev, raw], 1), torch.cat([torch.zeros_like(alpha[:, :1]), alpha], 1), None)
    return full[:, 1:]


def cached_attention(cache: DecodeCache, st: dict, q, k, v, log_forget=None, *, window, sink: int, scale=None,
                     store: bool = True, trim: bool = True) -> torch.Tensor:
    """The new queries ``q [B, t, Hq, D]`` (stream positions ``cache.length ..``) attend to every cached key
    of the layer state ``st`` after appending the new ``k``, ``v`` ``[B, t, Hkv, D/Dv]`` and FoX gates
    ``log_forget [B, t, Hq]`` (``store=False``: ``st`` is another layer's cache, read only); ``trim`` drops
    the keys the window hides from later queries. Returns ``[B, t, Hq, Dv]``."""
    if cache.attend is not None:
        return cache.attend(cache, st, q, k, v, log_forget, window=window, sink=sink, scale=scale, store=store,
                            trim=trim)
    if store:
        keys, values = _append(st, "k", k), _append(st, "v", v)
        log_forget = None if log_forget is None else _append(st, "lf", log_forget)
    else:
        keys, values = st["k"], st["v"]
    o = attention(q, keys, values, causal=True, scale=scale, window=window, sink=sink, log_forget=log_forget)
    if trim:
        _trim(st, ("k", "v", "lf"), window, sink)
    return o


def _attention_step(mix: Attention, x: torch.Tensor, seq: SeqInfo, st: dict, cache: DecodeCache) -> torch.Tensor:
    """A, G and F: the mixer's forward with K/V (and FoX gates) from the cache."""
    gate = None
    if isinstance(mix, GatedAttention):
        q, gate = mix._q_and_gate(x)
    else:
        q = mix._q(x)
    k, v = Attention._kv(mix, x, seq)  # unshifted: FoX's shift needs the cached previous token
    is_fox = isinstance(mix, FoX)
    if is_fox and mix.k_shift_proj is not None:
        k = _shift_with_history(st, "k_last", k, mix.k_shift_proj(x))
        v = _shift_with_history(st, "v_last", v, mix.v_shift_proj(x))
    q, k = mix._norm_rope(q, k, seq)
    o = cached_attention(cache, st, q, k, v, mix.log_forget(x) if is_fox else None, window=mix.window,
                         sink=seq.meta_tokens)
    if is_fox:
        if mix.out_norm is not None:
            o = mix.out_norm(o)
        if mix.out_gate_proj is not None:
            g = torch.sigmoid(at_least_fp32(mix.out_gate_proj(x))).to(o.dtype)
            o = o * g.unflatten(-1, (mix.n_heads, mix.head_dim))
    if gate is not None:
        o = o * torch.sigmoid(at_least_fp32(gate)).to(o.dtype)
    return mix.o_proj(o.flatten(2))


def _mla_step(mix: MLA, x: torch.Tensor, seq: SeqInfo, st: dict, cache: DecodeCache) -> torch.Tensor:
    b, t, _ = x.shape
    q_nope, q_rope = mix.queries(x).split([mix.nope_dim, mix.rope_dim], dim=-1)
    c_kv, k_rope = mix.kv_a_proj_with_mqa(x).split([mix.kv_lora_rank, mix.rope_dim], dim=-1)
    kv = mix.kv_b_proj(mix.kv_a_layernorm(c_kv)).unflatten(-1, (mix.n_heads, mix.nope_dim + mix.v_dim))
    k_nope, v = kv.split([mix.nope_dim, mix.v_dim], dim=-1)
    k_rope = k_rope[:, :, None, :]
    if mix.rotary is not None:
        q_rope, k_rope = mix.rotary(q_rope, seq.position_ids), mix.rotary(k_rope, seq.position_ids)
    q = torch.cat([q_nope, q_rope], dim=-1)
    k = torch.cat([k_nope, k_rope.expand(b, t, mix.n_heads, mix.rope_dim)], dim=-1)
    o = cached_attention(cache, st, q, k, v, scale=mix.qk_dim ** -0.5, window=mix.window, sink=seq.meta_tokens)
    return mix.o_proj(o.reshape(b, t, mix.n_heads * mix.v_dim))


def _conv_with_history(st: dict, key: str, x: torch.Tensor, width: int, conv) -> torch.Tensor:
    """A causal conv of width ``width`` continued across calls: the last ``width − 1`` inputs are kept
    and prepended (zeros before the first call, as the forward's zero padding)."""
    prev = st.get(key)
    if prev is None:
        prev = x.new_zeros(x.shape[0], width - 1, x.shape[2])
    full = torch.cat([prev, x], dim=1)
    st[key] = full[:, full.shape[1] - (width - 1):]
    return conv(full)[:, width - 1:]


def _kda_step(mix: KDA, x: torch.Tensor, seq: SeqInfo, st: dict) -> torch.Tensor:
    b, t, _ = x.shape
    h, hd, ks = mix.n_heads, mix.head_dim, mix.conv_size
    q = _conv_with_history(st, "q_conv", mix.q_proj(x), ks, mix.q_conv)
    k = _conv_with_history(st, "k_conv", mix.k_proj(x), ks, mix.k_conv)
    v = _conv_with_history(st, "v_conv", mix.v_proj(x), ks, mix.v_conv)
    q, k, v = l2_normalize(q.view(b, t, h, hd)), l2_normalize(k.view(b, t, h, hd)), v.view(b, t, h, hd)
    f = at_least_fp32(mix.f_b(mix.f_a(x))).view(b, t, h, hd) + at_least_fp32(mix.dt_bias).view(h, hd)
    g = -torch.exp(at_least_fp32(mix.A_log))[:, None] * F.softplus(f)
    beta = torch.sigmoid(at_least_fp32(mix.b_proj(x)))
    state = st.get("state")
    if t == 1:
        o, st["state"] = kda_recurrent_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
        o = o[:, None]
    else:
        o, st["state"] = kda(q, k, v, g, beta, chunk_size=mix.chunk_size, initial_state=state,
                             output_final_state=True)
    o = gated_rms_norm(o, mix.o_norm, mix.g_b(mix.g_a(x)).view(b, t, h, hd))
    return mix.o_proj(o.reshape(b, t, h * hd))


def _hymba_step(mix: Hymba, x: torch.Tensor, seq: SeqInfo, st: dict, cache: DecodeCache) -> torch.Tensor:
    b, t, _ = x.shape
    q, k, v, xs, z = mix.in_proj(x).split([mix.q_dim, mix.k_dim, mix.v_dim, mix.ssm_inner, mix.ssm_inner], dim=-1)
    # Attention branch, as Hymba._attention with K/V from the cache.
    q, k, v = mix.heads(q, k, v, seq)
    if mix.kv_source is None:
        # A shared cache must serve its readers' windows: only an unshared one is trimmed.
        o = cached_attention(cache, st, q, k, v, window=mix.window, sink=seq.meta_tokens, trim=not mix.stores_kv)
    else:
        o = cached_attention(cache, cache.layers[mix.kv_source], q, None, None, window=mix.window,
                             sink=seq.meta_tokens, store=False, trim=False)
    attn = o.reshape(b, t, mix.n_heads * mix.v_head_dim)
    # SSM branch, as Hymba.ssm for one document, continued from the cached conv inputs and state.
    xs = F.silu(_conv_with_history(st, "conv", xs, mix.d_conv, lambda u: mix._conv(u, None)))
    dt, b_in, c_out = mix.x_proj(xs).split([mix.dt_rank, mix.d_state, mix.d_state], dim=-1)
    dt, b_in, c_out = mix.dt_layernorm(dt), mix.B_layernorm(b_in), mix.C_layernorm(c_out)
    acc = torch.promote_types(xs.dtype, torch.float32)
    dt = F.softplus(F.linear(dt, mix.dt_proj.weight).to(acc) + mix.dt_proj.bias.to(acc))
    A = -torch.exp(mix.A_log.to(acc))
    state = st.get("ssm")
    if t == 1:
        if state is None:
            state = torch.zeros(b, mix.ssm_inner, mix.d_state, dtype=acc, device=x.device)
        y, st["ssm"] = selective_state_step(state, xs[:, 0], dt[:, 0], A, b_in[:, 0], c_out[:, 0], mix.D, z[:, 0])
        y = y[:, None]
    else:
        y, st["ssm"] = selective_scan(xs, dt, A, b_in, c_out, mix.D, z, initial_state=state,
                                      output_final_state=True)
    return mix.out_proj((mix.pre_avg_layernorm1(attn) + mix.pre_avg_layernorm2(y)) / 2)


def mixer_step(mix: torch.nn.Module, x: torch.Tensor, seq: SeqInfo, st: dict, cache: DecodeCache) -> torch.Tensor:
    """One mixer on the new positions ``x [B, T, d]`` → ``[B, T, d]``, updating its state ``st``."""
    if getattr(mix, "s2", None) is not None:
        raise NotImplementedError("no incremental decoding with the S2 attention pattern (model.s2.enabled)")
    if isinstance(mix, Attention):  # A, G, F
        return _attention_step(mix, x, seq, st, cache)
    if isinstance(mix, MLA):
        return _mla_step(mix, x, seq, st, cache)
    if isinstance(mix, KDA):
        return _kda_step(mix, x, seq, st)
    if isinstance(mix, Hymba):
        return _hymba_step(mix, x, seq, st, cache)
    raise NotImplementedError(f"no incremental decoding step for mixer {type(mix).__name__}")


@torch.no_grad()
def decode_step(model: torch.nn.Module, input_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
    """Feed ``input_ids [B, T]`` (int64) after what ``cache`` holds; returns logits ``[B, T, V]``
    in the model's dtype and advances the cache. The first call (empty cache) is the prefill."""
    b, t = input_ids.shape
    h = model.embed(input_ids)
    m = 0 if model.meta is None else model.meta.shape[0]
    prefix = m if cache.length == 0 else 0
    if prefix:
        h = torch.cat([model.meta.to(h.dtype).expand(b, m, -1), h], dim=1)
    n = h.shape[1]
    pos = torch.arange(cache.length, cache.length + n, device=h.device).expand(b, n)
    seq = SeqInfo(position_ids=pos, doc_ids=None, meta_tokens=m)
    if model.n_streams:
        h = expand_streams(h, model.n_streams)
    for i, layer in enumerate(model.layers):
        st = cache.layers.setdefault(i, {})
        h = layer.mixer_conn(h, lambda x, layer=layer, st=st: mixer_step(layer.mixer, x, seq, st, cache))
        if layer.ffn is not None:
            h = layer.ffn_conn(h, layer.ffn)
    if model.n_streams:
        h = merge_streams(h)
    cache.length += n
    h = model.norm(h[:, prefix:])
    if hasattr(model, "output"):  # the head as the model defines it (a parallel wrapper may replace it)
        return model.output(h, None)
    return F.linear(h, model._head_weight())
