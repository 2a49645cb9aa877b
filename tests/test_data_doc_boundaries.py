"""Document-aware packing end to end: a packed row with document boundaries gives every document the
logits it gets when run alone, for every mixer letter (RoPE, positions restarting per document)."""

from __future__ import annotations

import pytest
import torch

from braid.models.hybrid import HybridLM
from helpers import rel_rms, tiny_model_config

LETTERS = ["A", "G", "F", "K", "M", "H"]
LENGTHS = [5, 1, 9, 4]  # includes a one-token document
TOL = 1e-5  # fp32: separate and packed runs differ only by summation order


def _model(letter: str, **overrides) -> HybridLM:
    torch.manual_seed(0)
    cfg = tiny_model_config(pattern=letter * 2, pos_emb="rope", **overrides)
    return HybridLM(cfg).eval()


def _packed_and_alone(model: HybridLM, lengths: list[int], with_doc_ids: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[1, sum(lengths), V]`` of the packed row and of each document run on its own."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (1, sum(lengths)), generator=gen)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, doc_ids=doc_ids if with_doc_ids else None)
        alone = torch.cat([model(part) for part in ids.split(lengths, 1)], 1)
    return packed, alone


@pytest.mark.parametrize("letter", LETTERS)
def test_packed_with_boundaries_equals_separate_documents(letter):
    model = _model(letter)
    packed, alone = _packed_and_alone(model, LENGTHS)
    assert rel_rms(packed, alone) < TOL
    # Counter-check that this can fail: without doc_ids later documents see earlier ones.
    leaky, _ = _packed_and_alone(model, LENGTHS, with_doc_ids=False)
    assert rel_rms(leaky[:, LENGTHS[0]:], alone[:, LENGTHS[0]:]) > 1e-3


@pytest.mark.parametrize("letter", LETTERS)
def test_packed_with_boundaries_and_meta_tokens(letter):
    """Meta tokens are prepended to every row and visible to every document (Hymba's design), so a
    packed row must still equal each document run alone with the same meta tokens in front."""
    model = _model(letter, meta_tokens=2)
    packed, alone = _packed_and_alone(model, LENGTHS)
    assert rel_rms(packed, alone) < TOL
    # Counter-check: the meta tokens matter to every document (zeroing them changes what it sees).
    with torch.no_grad():
        model.meta.mul_(0.0)
    _, blind = _packed_and_alone(model, LENGTHS)
    assert rel_rms(blind[:, LENGTHS[0]:], alone[:, LENGTHS[0]:]) > 1e-3
