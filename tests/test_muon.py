"""Muon: Newton–Schulz orthogonalises, one process equals ``torch.optim.Muon`` where the definitions
coincide (Keller Jordan's LR rule, bf16 iteration), the AdamW side equals ``torch.optim.AdamW``, the
parameter split, and the config keys. The dp_shard 2 × tp 2 equality is in tests/test_parallel_train.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from braid.config import load_config
from braid.errors import ConfigError
from braid.trainer.muon import MuonAdamW, lr_scale, newton_schulz
from braid.trainer.optim import build_optimizer, muon_param_ids
from tests.helpers import rel_rms


def test_newton_schulz_flattens_the_spectrum():
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32), (3, 16, 24)]:
        g = torch.randn(shape) * torch.logspace(-1, 0, shape[-1])  # columns 10× apart in scale
        s = torch.linalg.svdvals(newton_schulz(g, steps=5))
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s.min(), s.max())
        # The singular vectors are those of g: the result is close to U Vᵀ.
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        cos = (newton_schulz(g, steps=5) * (u @ vh)).sum((-2, -1)) / (u @ vh).square().sum((-2, -1))
        assert (cos > 0.85).all()


def test_newton_schulz_batches_like_one_matrix_at_a_time():
    g = torch.randn(4, 12, 20)
    assert torch.allclose(newton_schulz(g, 5), torch.stack([newton_schulz(x, 5) for x in g]), atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is not in this torch")
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon(nesterov):
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(24, 40) * 0.1), nn.Parameter(torch.randn(48, 16) * 0.1)]
    ours = [nn.Parameter(p.detach().clone()) for p in ref]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, ns_steps=5)
    torch_opt = torch.optim.Muon(ref, adjust_lr_fn="original", **kw)
    our_opt = MuonAdamW([{"params": ours, "muon": True, "weight_decay": 0.1}], lr=0.02, momentum=0.9,
                        nesterov=nesterov, ns_steps=5, lr_rule="original", ns_dtype=torch.bfloat16)
    start = [p.detach().clone() for p in ref]
    for _ in range(4):
        for a, b in zip(ref, ours):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        torch_opt.step()
        our_opt.step()
    for a, b, s in zip(ref, ours, start):
        assert rel_rms(b.detach() - s, a.detach() - s) < 1e-5  # the same bf16 operations


def test_adamw_side_matches_torch_adamw():
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(5, 3))]
    ours = [nn.Parameter(p.detach().clone()) for p in ref]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    our_opt = MuonAdamW([{"params": ours, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        for a, b in zip(ref, ours):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        torch_opt.step()
        our_opt.step()
    for a, b in zip(ref, ours):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_update_rms_matches_adamw_scale():
    """Moonlight's rule: the applied update's RMS is about 0.2·lr whatever the matrix's shape."""
    for shape in [(64, 256), (256, 64), (128, 128)]:
        ortho = newton_schulz(torch.randn(shape), 5)
        rms = (ortho * lr_scale(torch.Size(shape), "match_rms_adamw")).square().mean().sqrt()
        assert 0.15 < rms < 0.22, (shape, rms)


def _cfg(*extra: str):
    return load_config(None, ["model.preset=hybrid-tiny", "model.vocab_size=64", "train.optimizer=muon", *extra])


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    from braid.models.hybrid import HybridLM

    cfg = _cfg()
    model = HybridLM(cfg.model)
    ids = muon_param_ids(model)
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    assert "layers.0.mixer.q_proj.weight" in names and "layers.0.ffn.down_proj.weight" in names
    assert "layers.1.ffn.gate_up" in names  # stacked experts: one NS per expert
    stored_in_out = {n for n, p in model.named_parameters() if ids.get(id(p))}
    assert stored_in_out == {n for n in names if n.endswith((".ffn.gate_up", ".ffn.down"))}
    for n, p in model.named_parameters():
        if p.ndim < 2 or "embed" in n or "router" in n or "conv" in n or getattr(p, "_no_weight_decay", False):
            assert n not in names, n
    opt = build_optimizer(model, cfg.train)
    assert isinstance(opt, MuonAdamW)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))


def test_config_keys():
    assert _cfg("train.muon_lr_scale=original").train.muon_lr_scale == "original"
    with pytest.raises(ConfigError, match="train.optimizer"):
        _cfg("parallel.engine=deepspeed")
    with pytest.raises(ConfigError, match="train.muon_lr_scale"):
        _cfg("train.muon_lr_scale=sometimes")
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(None, ["train.optimizer=sgd"])


@pytest.mark.slow
def test_resume_continues_the_muon_trajectory(tmp_path):
    """Momentum buffers and AdamW moments go through the DCP checkpoint: a resumed run follows the
    uninterrupted one."""
    import shutil

    from tests.test_parallel_train import run_one_process, train_records

    muon = {"train.optimizer": "muon", "train.lr": 1e-2, "checkpoint.interval": 3}
    full = run_one_process(tmp_path / "full", "tiny", **muon)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", tmp_path / "resumed" / "checkpoints" / "step_3")
    resumed = run_one_process(tmp_path / "resumed", "tiny", **muon)
    assert [r["step"] for r in resumed] == [4, 5]
    for a, b in zip(resumed, full[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert train_records(tmp_path / "full")[-1]["step"] == 5


def test_stacked_in_out_matrices_step_like_their_transposes():
    """An ``[E, in, out]`` expert stack (group ``in_out``) takes the update of E ``[out, in]`` matrices,
    the ``original`` LR rule (which is not symmetric in m, n) included."""
    torch.manual_seed(0)
    stack = nn.Parameter(torch.randn(2, 16, 40) * 0.1)
    mats = [nn.Parameter(stack.detach()[e].T.clone()) for e in range(2)]
    kw = dict(lr=0.02, lr_rule="original")
    a = MuonAdamW([{"params": [stack], "muon": True, "in_out": True, "weight_decay": 0.1}], **kw)
    b = MuonAdamW([{"params": mats, "muon": True, "weight_decay": 0.1}], **kw)
    for _ in range(3):
        g = torch.randn_like(stack)
        stack.grad = g
        for e, m in enumerate(mats):
            m.grad = g[e].T.clone()
        a.step()
        b.step()
    for e, m in enumerate(mats):
        assert torch.allclose(stack.detach()[e].T, m.detach(), atol=1e-6)
