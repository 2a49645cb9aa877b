"""Incremental decoding (braid.models.decoding) equals full forward passes, per mixer; generation CLI."""

from __future__ import annotations

import pytest
import torch

from braid.config import FoxConfig, HymbaConfig, HyperConnectionConfig, KDAConfig, MLAConfig, MoEConfig
from braid.generate import generate
from braid.models.decoding import DecodeCache, decode_step
from braid.models.hybrid import HybridLM
from helpers import rel_rms, tiny_model_config

# Mixer letter (and variant) → ModelConfig overrides of the 2-layer, d=32 test model.
CASES = {
    "A-window-qknorm": dict(pattern="AAA", window=6, global_layers=[1], qk_norm=True),
    "G-elementwise": dict(pattern="GG", attn_gate="elementwise", qk_norm=True),
    "G-headwise": dict(pattern="GG", attn_gate="headwise"),
    "F-pro": dict(pattern="FF", qk_norm=True,
                  fox=FoxConfig(output_gate=True, output_norm=True, kv_shift=True, forget_bias_init=1.0)),
    "F-rope-window": dict(pattern="FF", window=5, fox=FoxConfig(rope=True)),
    "K": dict(pattern="KK", kda=KDAConfig(n_heads=2, head_dim=16, conv_size=4, chunk_size=4)),
    "M-qlora-rope-window": dict(pattern="MM", window=7, mla=MLAConfig(
        n_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)),
    "H-meta-window-kvshare": dict(
        pattern="HHH", n_kv_heads=2, meta_tokens=3, window=5, global_layers=[2],
        hymba=HymbaConfig(ssm_inner=64, v_head_dim=16, d_state=4, dt_rank=4, kv_share_groups=[[1, 2]])),
    "hc-dynamic-moe-KA": dict(pattern="KA", ffn_pattern="E", connection="hc",
                              hc=HyperConnectionConfig(rate=2, dynamic=True),
                              kda=KDAConfig(n_heads=2, head_dim=16, chunk_size=8),
                              moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32)),
}


def _model(overrides: dict, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(tiny_model_config(**overrides)).eval()
    with torch.no_grad():  # move every weight off its special init (ones, zeros, identity mixing)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_incremental_logits_equal_full_forward(case):
    """Prefill 5 tokens, one chunk of 4, then single tokens: every row of logits equals the full
    forward's (fp32, rel. RMS ≤ 1e-5), windows longer than the cache trimming included."""
    model = _model(CASES[case])
    x = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        cache = DecodeCache()
        parts = [decode_step(model, x[:, :5], cache), decode_step(model, x[:, 5:9], cache)]
        parts += [decode_step(model, x[:, i:i + 1], cache) for i in range(9, x.shape[1])]
    inc = torch.cat(parts, dim=1)
    assert inc.shape == full.shape
    assert rel_rms(inc, full) < 1e-5, case


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_equal_repeated_full_forward(case):
    model = _model(CASES[case], seed=3)
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, 8)
    full = generate(model, prompt, 8, use_cache=False)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, full), case


def test_sampling_is_seeded_and_respects_top_k():
    model = _model(CASES["A-window-qknorm"])
    prompt = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(0))
    a = generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # top_k = 1 is greedy whatever the temperature.
    g = generate(model, prompt, 12, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(g, generate(model, prompt, 12))
    # A tiny top_p keeps only the most likely token as well.
    p = generate(model, prompt, 12, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(p, generate(model, prompt, 12))


def test_generation_stops_at_eos():
    model = _model(CASES["G-headwise"])
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    first = generate(model, prompt, 1)[0, -1].item()
    out = generate(model, prompt, 20, eos_id=first)
    assert out.shape[1] == 5


def test_generate_cli_from_checkpoint(tmp_path, capsys):
    from braid.config import load_config
    from braid.convert.braid_checkpoint import save_braid_checkpoint

    cfg = load_config(None, ["model.preset=tiny", "model.d_model=32", "model.pattern=AK", "model.vocab_size=320"])
    save_braid_checkpoint(HybridLM(cfg.model), cfg, tmp_path / "run", step=2)
    from braid.generate import main

    args = ["--model", str(tmp_path / "run/checkpoints/latest"), "--prompt", "def ", "--max-new-tokens", "5"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(args + ["--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    assert main(args[:-1] + ["0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
