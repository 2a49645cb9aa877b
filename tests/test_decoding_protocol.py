"""The decoding contract between braid.models.decoding and the mixers: decoding drives the model and
names no mixer; a mixer decodes by defining ``new_cache`` and accepting ``forward(x, seq, cache)``
(a mixer defined here, in a test file, only needs its own class); one without it falls back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import braid.models.decoding as decoding
from braid.generate import generate
from braid.models.decoding import DecodeCache, decode_step, supports_incremental
from braid.models.hybrid import HybridLM
from braid.models.layers import SeqInfo
from braid.models.registry import mixer_class
from braid.models.seq_ops import LocalOps
from helpers import rel_rms, tiny_model_config


class PrefixMeanCache:
    def __init__(self):
        self.total, self.count = None, 0


class PrefixMean(nn.Module):
    """``y_t = W · mean_{j ≤ t} x_j``: a mixer whose decoding cache is a running sum."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def new_cache(self, stream) -> PrefixMeanCache:
        return PrefixMeanCache()

    def forward(self, x: torch.Tensor, seq: SeqInfo, cache=None) -> torch.Tensor:
        start = 0 if cache is None else cache.count
        sums = x.cumsum(1)
        if cache is not None:
            if cache.total is not None:
                sums = sums + cache.total
            cache.total, cache.count = sums[:, -1:], cache.count + x.shape[1]
        n = torch.arange(start + 1, start + x.shape[1] + 1, dtype=x.dtype, device=x.device)
        return self.proj(sums / n[None, :, None])


class NoCache(PrefixMean):
    new_cache = None


def _model(mixer_cls) -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config(pattern="AAK", meta_tokens=2)).eval()
    model.layers[1].mixer = mixer_cls(model.cfg.d_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_a_mixer_from_a_test_file_decodes_with_its_own_cache():
    model = _model(PrefixMean)
    assert supports_incremental(model)
    x = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = DecodeCache()
        parts = [decode_step(model, x[:, :4], cache)] + [decode_step(model, x[:, i:i + 1], cache)
                                                        for i in range(4, x.shape[1])]
    assert isinstance(cache.layers[1], PrefixMeanCache) and cache.layers[1].count == 2 + x.shape[1]
    assert rel_rms(torch.cat(parts, 1), full) < 1e-5


def test_a_mixer_without_cache_falls_back_to_full_forwards():
    model = _model(NoCache)
    assert not supports_incremental(model)
    prompt = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(2))
    assert generate(model, prompt, 4).shape == (1, 7)  # full forwards, no error
    with pytest.raises(NotImplementedError, match=r"layer 1: mixer NoCache has no cached decoding"):
        decode_step(model, prompt, DecodeCache())


def test_decoding_names_no_mixer():
    source = Path(decoding.__file__).read_text()
    imported = re.findall(r"^(?:from|import) braid\.models\.(\w+)", source, re.M)
    for letter in "AGFKMH":  # the built-in mixers
        cls = mixer_class(letter)
        assert not re.search(rf"\b{cls.__name__}\b", source), (letter, cls.__name__)
        assert cls.__module__.rsplit(".", 1)[-1] not in imported, (letter, cls.__module__)


def test_seq_info_defaults_to_single_device_ops():
    seq = SeqInfo(position_ids=torch.arange(4)[None], meta_tokens=3)
    assert isinstance(seq.ops, LocalOps) and seq.ops.meta == 3
    assert not hasattr(seq, "cp")
