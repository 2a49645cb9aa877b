"""Megatron-LM's ``--hybrid-layer-pattern`` letters in ``model.pattern``, translated to braid's.

In Megatron every character is one layer: ``M`` Mamba, ``*`` attention, ``-`` MLP, ``E`` MoE, and ``|``
a pipeline-stage boundary. In braid a layer is one mixer and one FFN: ``model.pattern`` holds the
mixers (``M`` is braid's MLA) and ``model.ffn_pattern`` the FFNs (``S`` SwiGLU, ``E`` MoE, ``-`` none).

A ``model.pattern`` holding any of ``* - E |`` is read the Megatron way (no braid mixer has these
letters): each mixer layer (``*`` = braid's ``A``, or any braid mixer letter but ``M``) starts a braid
layer, and the FFN layer right after it (``-`` = SwiGLU, ``E`` = MoE) becomes that layer's FFN; a mixer
with no FFN after it gets none. ``|`` ends a stage; the first layer of every later stage is recorded in
``model.stage_layers`` (single-stage runs ignore it). Anything braid cannot express, or could read two
ways, is a one-line ConfigError: an FFN layer with no mixer before it (two in a row, or first in a
stage), ``M`` (Mamba there, MLA here), an empty stage, or ``model.ffn_pattern`` set as well.
Torch-free: the config applies it before validation.
"""

from __future__ import annotations

from typing import Iterable

from braid.errors import ConfigError

MEGATRON_LETTERS = "*-E|"  # their presence makes model.pattern a Megatron-style pattern
_MIXER_ALIASES = {"*": "A"}
_FFN_LETTERS = {"-": "S", "E": "E"}  # Megatron layer → braid ffn_pattern letter
_NO_FFN = "-"  # braid's ffn_pattern letter for a layer without FFN


def is_megatron(pattern: str) -> bool:
    return any(ch in MEGATRON_LETTERS for ch in pattern)


def _fail(pattern: str, why: str) -> None:
    raise ConfigError(f"config key 'model.pattern' = {pattern!r} is invalid: {why}")


def translate(pattern: str, ffn_pattern: str, mixers: Iterable[str]) -> tuple[str, str, list[int]]:
    """A Megatron-style ``pattern`` → braid's ``(model.pattern, model.ffn_pattern, model.stage_layers)``.

    ``mixers``: braid's mixer letters. ``ffn_pattern`` must be the default ``S`` (the pattern gives the
    FFNs). A braid-style pattern (none of ``* - E |``) is returned as it is.
    """
    if not is_megatron(pattern):
        return pattern, ffn_pattern, []
    if ffn_pattern != "S":
        raise ConfigError(f"config key 'model.ffn_pattern' = {ffn_pattern!r} cannot be combined with the "
                          f"Megatron-style model.pattern {pattern!r}, whose '-'/'E' layers are the FFNs: "
                          "leave it unset")
    mixers = set(mixers) - {"M"}
    layers, ffns, stages = [], [], []
    for i, ch in enumerate(pattern):
        where = f"layer {ch!r} at position {i}"
        if ch == "|":
            if not layers or (stages and stages[-1] == len(layers)) or i == len(pattern) - 1:
                _fail(pattern, f"'|' at position {i} must separate two non-empty pipeline stages")
            stages.append(len(layers))
        elif ch in _FFN_LETTERS:
            if not layers or len(ffns) == len(layers) or (stages and stages[-1] == len(layers)):
                _fail(pattern, f"FFN {where} has no mixer layer right before it in its stage "
                               "(a braid layer is one mixer followed by at most one FFN)")
            ffns.append(_FFN_LETTERS[ch])
        elif ch == "M":
            _fail(pattern, "'M' is Mamba in Megatron's --hybrid-layer-pattern but MLA in braid, which has no "
                           "Mamba mixer: write MLA layers in braid's letters (model.pattern + model.ffn_pattern)")
        elif ch in _MIXER_ALIASES or ch in mixers:
            if len(ffns) < len(layers):
                ffns.append(_NO_FFN)
            layers.append(_MIXER_ALIASES.get(ch, ch))
        else:
            _fail(pattern, f"unknown {where} (a Megatron-style pattern takes * - E | and braid's mixer letters "
                           f"{''.join(sorted(mixers))})")
    if not layers:
        _fail(pattern, "it has no mixer layer")
    if len(ffns) < len(layers):
        ffns.append(_NO_FFN)
    return "".join(layers), "".join(ffns), stages
