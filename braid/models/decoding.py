"""Incremental decoding of a HybridLM: one forward per new chunk, each layer continuing from its cache.

``decode_step(model, input_ids [B, T], cache)`` runs only the new tokens and returns their logits
``[B, T, V]``, equal (up to rounding) to the last T rows of a full forward over everything seen so
far. The first call is the prefill (it prepends the meta tokens); later calls may pass one token or
several.

This module only drives the model: positions, meta tokens, the connections and FFNs, and one cache
object per layer. What a layer keeps (keys and values, conv tails, recurrent states) is its mixer's
business: a mixer supports cached decoding by defining ``new_cache(stream)`` (its cache object, see
``braid.models.caches``) and accepting it as ``forward(x, seq, cache=...)``. Padding and packed
documents are not supported (one sequence per row, all rows the same length).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from braid.models.connections import expand_streams, merge_streams
from braid.models.layers import SeqInfo


@dataclass
class DecodeCache:
    """What incremental decoding keeps between calls. ``length``: stream positions processed so far
    (meta tokens included); ``layers``: each layer's cache object (its mixer's ``new_cache``), by
    layer index; ``attend``: when set, replaces ``braid.models.caches.KVCache.attend``'s body (same
    arguments after ``(stream, kv)``), e.g. a KV cache sharded over ranks
    (``braid.parallel.context.tree_decode``)."""

    length: int = 0
    layers: dict = field(default_factory=dict)
    attend: Optional[Callable] = None


def _new_cache(mixer: torch.nn.Module, stream: DecodeCache):
    """The mixer's cache object for ``stream``, or None when it has no cached decoding."""
    make = getattr(mixer, "new_cache", None)
    return None if make is None else make(stream)


def supports_incremental(model: torch.nn.Module) -> bool:
    """True when every mixer of ``model`` decodes with a cache (else generation runs full forwards)."""
    probe = DecodeCache()
    return all(_new_cache(layer.mixer, probe) is not None for layer in model.layers)


def _layer_cache(cache: DecodeCache, i: int, mixer: torch.nn.Module):
    if i not in cache.layers:
        layer_cache = _new_cache(mixer, cache)
        if layer_cache is None:
            raise NotImplementedError(f"layer {i}: mixer {type(mixer).__name__} has no cached decoding "
                                      "(no new_cache, or not for this configuration)")
        cache.layers[i] = layer_cache
    return cache.layers[i]


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
        layer_cache = _layer_cache(cache, i, layer.mixer)
        h = layer.mixer_conn(h, lambda x, mixer=layer.mixer, c=layer_cache: mixer(x, seq, cache=c))
        if layer.ffn is not None:
            h = layer.ffn_conn(h, layer.ffn)
    if model.n_streams:
        h = merge_streams(h)
    cache.length += n
    h = model.norm(h[:, prefix:])
    if hasattr(model, "output"):  # the head as the model defines it (a parallel wrapper may replace it)
        return model.output(h, None)
    return F.linear(h, model._head_weight())
