"""MoE under context parallelism: the sequence-level balance loss sees the whole sequence (its
statistics are summed over the cp ranks, meta rows counted once), so the objective the trainer
builds — token-weighted losses plus each rank's aux loss weighted by its share of the tokens — has
the cp = 1 gradient (fp32, rel RMS ≤ 1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from braid.config import MoEConfig
from braid.models.hybrid import HybridLM, aux_loss
from helpers import rel_rms, tiny_model_config
from spawn_group import run_group

B, T = 2, 16
CASES = {
    "aux+z": dict(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16, aux_loss_coef=0.05, z_loss_coef=0.01)),
    "aux+meta": dict(meta_tokens=2, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=16, aux_loss_coef=0.05)),
}


def _objective(model, batch, n_global: int):
    loss = model(**batch)
    n_local = batch["input_ids"].numel()
    return loss.sum() / n_global + aux_loss(model) * (n_local / n_global)


def run_cases() -> dict:
    from braid.parallel.context import apply_cp

    out = {}
    for name, extra in CASES.items():
        cfg = tiny_model_config(pattern="AA", ffn_pattern="E", **extra)
        torch.manual_seed(0)
        ref = HybridLM(cfg)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model = copy.deepcopy(ref)
        cp = apply_cp(model, dist.group.WORLD, "ring", "zigzag")
        g = torch.Generator().manual_seed(3)
        batch = dict(input_ids=torch.randint(0, cfg.vocab_size, (B, T), generator=g),
                     labels=torch.randint(0, cfg.vocab_size, (B, T), generator=g))
        _objective(ref, batch, B * T).backward()
        _objective(model, cp.shard_batch(batch), B * T).backward()
        errs = {}
        for (n, p_ref), p in zip(ref.named_parameters(), model.parameters()):
            dist.all_reduce(p.grad)
            errs[n] = rel_rms(p.grad, p_ref.grad)
        out[name] = errs
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_moe_balance_loss_gradients_match_cp1(case):
    errs = run_group(2, "test_cp_moe.run_cases")[case]
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-5, f"{worst}: {errs[worst]:.2e}"
