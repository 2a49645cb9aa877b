"""Building blocks of the per-layer caches of incremental decoding (``braid.models.decoding``).

A mixer that supports cached decoding defines ``new_cache(stream)`` returning its layer's cache
object (declared in the mixer's own file, made of these blocks), and its ``forward(x, seq, cache)``
reads and updates that object when ``cache`` is given. ``stream`` is the model-wide decoding state
(``braid.models.decoding.DecodeCache``): ``length``, the stream positions (meta tokens included)
processed before the current call, and ``attend``, an optional replacement of
:meth:`KVCache.attend`'s body (e.g. the KV cache sharded over ranks, ``braid.parallel.context.tree_decode``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from braid.kernels import attention


class KVCache(dict):
    """The keys and values one attention layer has seen, and how new queries attend to them.

    A dict of tensors (so a replacement ``attend`` may keep its own entries): ``"k"`` / ``"v"``
    ``[B, S, Hkv, D/Dv]`` post-norm, post-RoPE, and with forget gates ``"lf"`` ``[B, S, Hq]``. A
    windowed layer keeps only the sink keys and its last ``window`` keys (older ones can never be
    seen again).
    """

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def attend(self, q, k, v, log_forget=None, *, window: Optional[int], sink: int, scale: Optional[float] = None,
               store: bool = True, trim: bool = True) -> torch.Tensor:
        """The new queries ``q [B, t, Hq, D]`` (stream positions ``stream.length ..``) attend to every
        cached key after appending the new ``k``, ``v`` ``[B, t, Hkv, D/Dv]`` and forget gates
        ``log_forget [B, t, Hq]`` (``store=False``: another layer reads this cache, k/v unused);
        ``trim`` drops the keys the window hides from later queries. Returns ``[B, t, Hq, Dv]``."""
        hook = self.stream.attend
        if hook is not None:
            return hook(self.stream, self, q, k, v, log_forget, window=window, sink=sink, scale=scale, store=store,
                        trim=trim)
        if store:
            keys, values = self._append("k", k), self._append("v", v)
            log_forget = None if log_forget is None else self._append("lf", log_forget)
        else:
            keys, values = self["k"], self["v"]
        o = attention(q, keys, values, causal=True, scale=scale, window=window, sink=sink, log_forget=log_forget)
        if trim:
            self._trim(("k", "v", "lf"), window, sink)
        return o

    def _append(self, key: str, new: torch.Tensor) -> torch.Tensor:
        self[key] = new if key not in self else torch.cat([self[key], new], dim=1)
        return self[key]

    def _trim(self, keys: tuple[str, ...], window: Optional[int], sink: int) -> None:
        """Drop keys no future query can see: all but the ``sink`` first and the ``window`` last.

        The kept keys stay contiguous up to the newest, so index distances (window test, forget-gate
        sums) equal the true ones, and the oldest kept non-sink key is already ``window`` away from
        any new query.
        """
        if window is None:
            return
        for key in keys:
            if key in self and self[key].shape[1] > sink + window:
                t = self[key]
                self[key] = torch.cat([t[:, :sink], t[:, -window:]], dim=1)


def conv_continued(tail: Optional[torch.Tensor], x: torch.Tensor, width: int,
                   conv: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal conv of ``width`` taps over ``x [B, t, C]`` continued across calls: ``tail`` holds the
    previous calls' last ``width − 1`` inputs (None before the first call: zeros, as the forward's
    zero padding). ``conv`` maps ``[B, S, C]`` to its causal output ``[B, S, C]``. Returns the new
    rows' output ``[B, t, C]`` and the next tail."""
    if tail is None:
        tail = x.new_zeros(x.shape[0], width - 1, x.shape[2])
    full = torch.cat([tail, x], dim=1)
    return conv(full)[:, width - 1:], full[:, full.shape[1] - (width - 1):]
