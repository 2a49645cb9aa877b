"""from-hf → braid → to-hf for the stock classes: bit-identical weights, same logits, runs can start."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from braid.convert import load
from braid.convert.__main__ import main as convert_main
from braid.convert.hf_export import read_safetensors

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, intermediate_size=48, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _stock(kind: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    rope = {"rope_type": "default", "rope_theta": 5000.0}
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=rope))
    if kind == "qwen3-swa-tied":
        cfg = Qwen3Config(**{**SMALL, "tie_word_embeddings": True}, rope_parameters=rope, use_sliding_window=True,
                          sliding_window=5, max_window_layers=0, layer_types=["sliding_attention", "full_attention"])
        return Qwen3ForCausalLM(cfg)
    cfg = Qwen3MoeConfig(**SMALL, rope_parameters=rope, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, norm_topk_prob=True)
    return Qwen3MoeForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["llama", pytest.param("qwen3-swa-tied", marks=pytest.mark.slow), "qwen3-moe"])
def test_from_hf_to_hf_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    hf = _stock(kind).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))  # norms off 1, so a swapped norm cannot hide
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "src")
    run = tmp_path / "run"
    assert convert_main(["from-hf", "--hf", str(tmp_path / "src"), "--out", str(run)]) == 0
    loaded = load(run / "checkpoints" / "latest")
    x = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (loaded.model(x) - hf(input_ids=x).logits).abs().max().item() <= 1e-4
    assert convert_main(["to-hf", "--checkpoint", str(run / "checkpoints" / "latest"), "--out",
                         str(tmp_path / "back")]) == 0
    src, back = read_safetensors(tmp_path / "src"), read_safetensors(tmp_path / "back")
    if "mlp.experts.gate_up_proj" in " ".join(src):  # transformers saved its fused expert layout
        from braid.convert.stock import from_hf_state, to_hf_state

        src = to_hf_state(from_hf_state(src, n_experts=4))
    assert sorted(src) == sorted(back)
    for key in src:
        assert src[key].dtype == back[key].dtype and torch.equal(src[key], back[key]), key
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "back"))
    for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps", "tie_word_embeddings",
                "vocab_size", "rope_parameters", "sliding_window", "layer_types", "num_local_experts",
                "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        assert a.get(key) == b.get(key), key


def test_from_hf_rejects_other_architectures(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert convert_main(["from-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and len(err.strip().splitlines()) == 1


def test_kimi_linear_from_hf_to_hf_round_trip(tmp_path):
    """A KimiLinearForCausalLM saved by transformers (the released layout: q/k/v_conv1d, per-expert
    w1/w2/w3 under block_sparse_moe) → braid → to-hf: same logits, bit-identical weights, same config."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "KimiLinearForCausalLM"):
        pytest.skip("this transformers has no KimiLinearForCausalLM")
    from braid.convert import stock_kimi

    # rms_norm_eps 1e-6: transformers' MLA latent norm always uses 1e-6 (see stock_kimi), so this is exact.
    cfg = transformers.KimiLinearConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
        v_head_dim=8, num_local_experts=4, num_experts_per_tok=2, linear_head_dim=8, linear_num_heads=2,
        rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=None, eos_token_id=None,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"])
    torch.manual_seed(0)
    hf = transformers.KimiLinearForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))  # a trained selection bias changes the routing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "src")
    run = tmp_path / "run"
    assert convert_main(["from-hf", "--hf", str(tmp_path / "src"), "--out", str(run)]) == 0
    loaded = load(run / "checkpoints" / "latest")
    x = torch.randint(0, 96, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (loaded.model(x) - hf(input_ids=x).logits).abs().max().item() <= 1e-4
    assert convert_main(["to-hf", "--checkpoint", str(run / "checkpoints" / "latest"), "--out",
                         str(tmp_path / "back")]) == 0
    src, back = read_safetensors(tmp_path / "src"), read_safetensors(tmp_path / "back")
    # transformers writes the dense layer under block_sparse_moe.; braid, as released, under mlp.
    src = stock_kimi.to_hf_state(stock_kimi.from_hf_state(src, n_experts=4))
    assert sorted(src) == sorted(back)
    for key in src:
        assert src[key].dtype == back[key].dtype and torch.equal(src[key], back[key]), key
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "back"))
    assert b["architectures"] == ["KimiLinearForCausalLM"]
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                "qk_nope_head_dim", "v_head_dim", "layer_types", "mlp_layer_types", "linear_head_dim",
                "linear_num_heads", "linear_conv_kernel_dim", "num_experts", "num_experts_per_token",
                "num_shared_experts", "moe_renormalize", "routed_scaling_factor", "num_expert_group", "topk_group",
                "rms_norm_eps", "tie_word_embeddings", "vocab_size"):
        assert a.get(key) == b.get(key), key
