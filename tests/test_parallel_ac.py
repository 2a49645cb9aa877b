"""Activation checkpointing changes memory, not numbers: losses and gradients with ``full`` and
``every_<N>`` equal those without, for mixers with side outputs (Hymba's shared K/V) and MoE
(whose load counters must not count the recompute twice); checkpoints load across AC settings."""

from __future__ import annotations

import pytest
import torch

from braid.config import load_config
from braid.models.hybrid import HybridLM
from braid.models.stats import resolve_vocab
from braid.parallel.activation_checkpoint import apply_activation_checkpoint
from helpers import rel_rms


def build(preset: str, seed: int = 0) -> HybridLM:
    cfg = load_config(None, [f"model.preset={preset}"]).model
    torch.manual_seed(seed)
    return HybridLM(resolve_vocab(cfg, 256))


def loss_and_grads(model: HybridLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                           for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset,spec", [("hymba-tiny", "full"), ("gated-attn-moe-tiny", "every_2"),
                                         ("kimi-linear-tiny", "full"), ("gdn-tiny", "every_2")])
def test_checkpointed_blocks_give_the_same_loss_and_gradients(preset, spec):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 17))
    plain, ckpt = build(preset), build(preset)
    chosen = apply_activation_checkpoint(ckpt.layers, spec)
    assert chosen
    loss_a, grads_a = loss_and_grads(plain, ids)
    loss_b, grads_b = loss_and_grads(ckpt, ids)
    assert grads_a.keys() == grads_b.keys()
    assert rel_rms(loss_b, loss_a) <= 1e-6
    for name in grads_a:
        assert rel_rms(grads_b[name], grads_a[name]) <= 1e-5, name
    # MoE loads: counted once per forward, not again by the recompute in backward.
    for (na, a), (nb, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        if na.endswith("load_counts"):
            assert torch.equal(a, b), nb
    # State-dict keys do not see the wrapper, so checkpoints load with or without AC.
    assert plain.state_dict().keys() == ckpt.state_dict().keys()


def test_training_with_and_without_ac_gives_identical_losses(tmp_path):
    from braid.trainer.trainer import Trainer
    from test_parallel_train import overrides

    losses = {}
    for spec in ("none", "full"):
        cfg = load_config(None, overrides(tmp_path / spec, "moe-tiny", **{
            "train.steps": 3, "parallel.activation_checkpoint": spec}))
        losses[spec] = Trainer(cfg).train()
    assert losses["full"] == pytest.approx(losses["none"], rel=1e-6)
