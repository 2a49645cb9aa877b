"""Pattern letters → mixer and FFN classes.

Built-in entries are stored as import paths so that reading the letters (config validation) does not
import torch; `register_mixer`/`register_ffn` also accept classes, so a new mixer is one decorator.
A mixer class is constructed as ``cls(cfg: ModelConfig, layer_idx: int)`` and called as
``mixer(x [B,T,d], seq: SeqInfo) -> [B,T,d]``; an FFN as ``cls(cfg, layer_idx)`` and ``ffn(x)``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Union

_Entry = Union[str, type]

_MIXERS: dict[str, _Entry] = {
    "A": "braid.models.attention:Attention",  # softmax attention (GQA, RoPE, QK-norm, window)
    "G": "braid.models.gated_attention:GatedAttention",  # + sigmoid output gate (Qiu et al.)
    "F": "braid.models.fox:FoX",  # Forgetting Transformer
    "K": "braid.models.kda:KDA",  # Kimi Delta Attention
    "M": "braid.models.mla:MLA",  # multi-head latent attention
    "H": "braid.models.hymba:Hymba",  # Hymba hybrid attention + SSM heads
}
_FFNS: dict[str, _Entry] = {
    "S": "braid.models.ffn:SwiGLU",
    "E": "braid.models.moe:MoE",
    "-": "braid.models.ffn:NoFFN",  # mixer-only layer
}


def _register(table: dict[str, _Entry], kind: str, letter: str) -> Callable[[type], type]:
    if len(letter) != 1:
        raise ValueError(f"{kind} letter must be a single character, got {letter!r}")

    def deco(cls: type) -> type:
        if letter in table and table[letter] is not cls and not _same(table[letter], cls):
            raise ValueError(f"{kind} letter {letter!r} is already registered to {table[letter]}")
        table[letter] = cls
        return cls

    return deco


def _same(entry: _Entry, cls: type) -> bool:
    return isinstance(entry, str) and entry == f"{cls.__module__}:{cls.__qualname__}"


def _resolve(table: dict[str, _Entry], kind: str, letter: str) -> type:
    if letter not in table:
        raise KeyError(f"unknown {kind} letter {letter!r} (known: {''.join(sorted(table))})")
    entry = table[letter]
    if isinstance(entry, str):
        module, name = entry.split(":")
        entry = getattr(importlib.import_module(module), name)
        table[letter] = entry
    return entry


def register_mixer(letter: str) -> Callable[[type], type]:
    """Class decorator: make ``letter`` in ``model.pattern`` build this mixer."""
    return _register(_MIXERS, "mixer", letter)


def register_ffn(letter: str) -> Callable[[type], type]:
    """Class decorator: make ``letter`` in ``model.ffn_pattern`` build this FFN."""
    return _register(_FFNS, "ffn", letter)


def mixer_class(letter: str) -> type:
    return _resolve(_MIXERS, "mixer", letter)


def ffn_class(letter: str) -> type:
    return _resolve(_FFNS, "ffn", letter)


def mixer_letters() -> set[str]:
    return set(_MIXERS)


def ffn_letters() -> set[str]:
    return set(_FFNS)
