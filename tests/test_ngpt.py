"""nGPT (model.connection=ngpt): the connection is the paper's update rule, the model keeps its hidden
states and weights on the unit sphere (at init and after every trainer step), logits are scaled, and it
trains. The FSDP2 equality with one process is in tests/test_parallel_train.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from braid.config import load_config
from braid.errors import ConfigError
from braid.models.hybrid import HybridLM
from braid.models.ngpt import ALPHA_INIT, NGPTConnection, normalized_params
from tests.helpers import tiny_model_config


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True)


def test_connection_is_the_papers_update_rule():
    """h ← Norm(h + α (Norm(f(h)) − h)) with α = α_p · α_init / α_scale (eqs. 10-11, their §2.6)."""
    torch.manual_seed(0)
    d = 32
    conn = NGPTConnection(tiny_model_config(d_model=d, connection="ngpt"), 0).double()
    assert torch.allclose(conn.alpha(), torch.full((d,), ALPHA_INIT, dtype=torch.float64))
    with torch.no_grad():
        conn.alpha.param.uniform_(0.05, 0.5)
    f = nn.Linear(d, d).double()
    h = _unit(torch.randn(2, 5, d, dtype=torch.float64), -1)
    alpha = conn.alpha.param * (ALPHA_INIT * math.sqrt(d))
    want = _unit(h + alpha * (_unit(f(h), -1) - h), -1)
    got = conn(h, f)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2, 5, dtype=torch.float64))
    # α = 1 replaces h by the normalised sublayer output; α = 0 keeps h.
    with torch.no_grad():
        conn.alpha.param.fill_(1 / (ALPHA_INIT * math.sqrt(d)))
    assert torch.allclose(conn(h, f), _unit(f(h), -1), atol=1e-12)
    with torch.no_grad():
        conn.alpha.param.zero_()
    assert torch.allclose(conn(h, f), h, atol=1e-12)


def _model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(tiny_model_config(connection="ngpt", pattern="AGA", ffn_pattern="S"))


def _assert_unit_weights(model: nn.Module) -> None:
    found = {name: dim for name, _, dim in normalized_params(model)}
    # Rows over d for what reads the hidden state, columns for what writes it.
    assert found["embed.weight"] == 1 and found["lm_head.weight"] == 1
    assert found["layers.0.mixer.q_proj.weight"] == 1 and found["layers.1.ffn.up_proj.weight"] == 1
    assert found["layers.0.mixer.o_proj.weight"] == 0 and found["layers.2.ffn.down_proj.weight"] == 0
    for name, p, dim in normalized_params(model):
        norms = p.detach().norm(dim=dim)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), name


def test_weights_and_hidden_states_are_on_the_sphere():
    model = _model()
    _assert_unit_weights(model)
    seen = []
    for layer in model.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append(out.norm(dim=-1)))
    ids = torch.randint(0, 64, (2, 12))
    logits = model(ids)
    assert len(seen) == 3 and all(torch.allclose(n, torch.ones_like(n), atol=1e-5) for n in seen)
    # Logits: s_z (init 1) times the cosine of the unit hidden state and a unit head row.
    assert logits.abs().max() <= 1 + 1e-5
    with torch.no_grad():
        model.logit_scale.param.mul_(3)
    assert torch.allclose(model(ids), 3 * logits, atol=1e-5)


def test_trains_and_the_trainer_renormalises_after_each_step(tmp_path):
    from braid.trainer.trainer import Trainer
    from tests.test_parallel_train import overrides, train_records

    cfg = load_config(None, overrides(tmp_path, "llama-tiny", **{"model.connection": "ngpt", "train.steps": 6,
                                                                  "train.lr": 1e-2, "train.weight_decay": 0.0}))
    trainer = Trainer(cfg)
    trainer.train()
    _assert_unit_weights(trainer.model)
    losses = [r["loss"] for r in train_records(tmp_path)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.3


def test_config_refuses_what_the_normalisation_does_not_cover():
    base = ["model.preset=llama-tiny", "model.connection=ngpt"]
    assert load_config(None, base).model.connection == "ngpt"
    for extra in ["model.ffn_pattern=E", "parallel.tp=2", "parallel.engine=deepspeed", "model.meta_tokens=4"]:
        with pytest.raises(ConfigError, match="model.connection"):
            load_config(None, [*base, extra])


def test_incremental_decoding_gives_the_forward_logits():
    from braid.models.decoding import DecodeCache, decode_step

    model = _model().eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full = model(ids)
    cache = DecodeCache()
    steps = [decode_step(model, ids[:, :6], cache)] + [decode_step(model, ids[:, i:i + 1], cache) for i in range(6, 10)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.slow
def test_hf_export_gives_the_same_logits(tmp_path):
    """Written as remote code (stock classes have no nGPT), loaded back by transformers."""
    from transformers import AutoModelForCausalLM

    from braid.convert.hf_export import export_hf
    from braid.models.ngpt import normalize_weights_
    from tests.test_convert import random_model

    model, cfg = random_model("llama-tiny", "model.connection=ngpt")
    normalize_weights_(model)
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        want = model(ids)
    export_hf(model, cfg, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5
