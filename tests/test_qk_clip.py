"""QK-clip: the attention forward's max logit equals the brute-force one over the visible pairs, and the
clip scales each head's logits by exactly min(1, tau / S_h) (MHA, GQA, gated attention), then a
training run with it on."""

from __future__ import annotations

import math

import pytest
import torch

from braid.config import load_config
from braid.errors import ConfigError
from braid.kernels.attention import attention_mask
from braid.models.attention import Attention
from braid.models.gated_attention import GatedAttention
from braid.models.layers import SeqInfo
from braid.trainer import qk_clip
from tests.helpers import tiny_model_config

B, T = 2, 24


def _inputs(window_docs: bool):
    torch.manual_seed(1)
    x = torch.randn(B, T, 32) * 3
    pos = torch.arange(T).expand(B, T)
    docs = (torch.arange(T) >= 10).long().expand(B, T).contiguous() if window_docs else None
    return x, SeqInfo(position_ids=pos, doc_ids=docs)


def _brute_max(m: Attention, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
    k, _ = m._kv(x, seq)
    q, k = m._norm_rope(m._q(x), k, seq)
    k = k.repeat_interleave(m.n_heads // m.n_kv_heads, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / m.head_dim ** 0.5
    mask = attention_mask(T, T, causal=True, window=m.window, doc_ids=seq.doc_ids, sink=seq.meta_tokens)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool).tril()
    return s.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3))


def _module(cls, **cfg):
    return cls(tiny_model_config(qk_norm=False, **cfg), 0)


CASES = [(Attention, {"n_kv_heads": 4}), (Attention, {}), (GatedAttention, {}),
         (Attention, {"window": 6})]


@pytest.mark.parametrize("cls,cfg", CASES)
@pytest.mark.parametrize("docs", [False, True])
def test_forward_records_the_max_visible_logit(cls, cfg, docs):
    m = _module(cls, **cfg)
    assert qk_clip.enable(m) == 1
    x, seq = _inputs(docs)
    m(x, seq)
    m(x[:, :, :] * 0.5, seq)  # a second micro-batch: the running max keeps the first one's
    want = torch.maximum(_brute_max(m, x, seq), _brute_max(m, x * 0.5, seq))
    assert torch.allclose(m.max_logit, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation forwards do not count
        m(x * 10, seq)
    assert torch.allclose(m.max_logit, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,cfg", CASES)
def test_clip_scales_each_heads_logits_to_the_threshold(cls, cfg):
    m = _module(cls, **cfg)
    qk_clip.enable(m)
    x, seq = _inputs(True)
    before = _brute_max(m, x, seq).detach()
    tau = float(before.median())  # about half the heads above it
    m(x, seq)
    worst = qk_clip.qk_clip(m, tau, reduce_max=lambda t: t)
    assert worst == pytest.approx(before.max().item(), rel=1e-5)
    assert m.max_logit is None
    after = _brute_max(m, x, seq).detach()
    assert torch.allclose(after, torch.minimum(before, torch.tensor(tau)), rtol=1e-4, atol=1e-5)
    if cls is GatedAttention:  # the gate rows of q_proj are not touched: same gate logits
        fresh = _module(cls, **cfg)
        gate_rows = m.q_row_heads() < 0
        assert torch.equal(m.q_proj.weight[gate_rows], fresh.q_proj.weight[gate_rows])


def test_layers_with_qk_norm_are_not_tracked():
    m = Attention(tiny_model_config(qk_norm=True), 0)
    assert qk_clip.enable(m) == 0


def test_config_refuses_tp_and_cp():
    base = ["model.preset=tiny", "train.qk_clip=50"]
    assert load_config(None, base).train.qk_clip == 50
    for extra in ["parallel.tp=2", "parallel.cp=2", "parallel.engine=deepspeed"]:
        with pytest.raises(ConfigError, match="train.qk_clip"):
            load_config(None, [*base, extra])


def test_training_with_muon_and_qk_clip_clips_after_every_step(tmp_path):
    """llama-tiny (no QK-norm, logits about 0.2 at init) with a threshold below that: the trainer clips
    after every step, and the run trains."""
    from braid.trainer.trainer import Trainer
    from tests.test_parallel_train import overrides, train_records

    tau = 0.1
    cfg = load_config(None, overrides(tmp_path, "llama-tiny", **{"train.optimizer": "muon", "train.qk_clip": tau,
                                                                 "train.steps": 3, "train.lr": 1e-2}))
    trainer = Trainer(cfg)
    seen = []
    real = qk_clip.qk_clip

    def spy(model, tau_, reduce_max):
        seen.append(real(model, tau_, reduce_max))
        return seen[-1]

    qk_clip.qk_clip = spy
    try:
        trainer.train()
    finally:
        qk_clip.qk_clip = real
    assert len(seen) == 3 and all(s > tau for s in seen)  # it had something to clip at every step
    losses = [r["loss"] for r in train_records(tmp_path)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
