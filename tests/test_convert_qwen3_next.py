"""Export of Gated DeltaNet + gated attention models to the stock ``Qwen3NextForCausalLM``: logits
within 1e-4 of braid's, a dense (``mlp_only_layers``) layer included; the exported directory and a
checkpoint the stock class wrote itself (random shared-expert gates, partial RoPE) load back into braid; what
braid cannot express (an odd partial RoPE) is refused by name on import, and a model the stock class cannot
compute goes out as remote code."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from braid.convert import load_model, stock_qwen3_next
from braid.convert.hf_export import export_hf
from braid.convert.stock_qwen3_next import hf_config, model_config_from_hf
from test_convert import VOCAB, auto_logits, random_model

pytestmark = pytest.mark.skipif(not stock_qwen3_next.available(), reason="this transformers has no Qwen3-Next")

DENSE_FIRST = "model.ffn_pattern=SEEE"


def _ids(b=2, t=24, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norms,gate", [("model.norm_zero_centered=true", "model.moe.shared_gate=true"),
                                        ("model.norm_zero_centered=false", "model.moe.shared_gate=false")])
def test_export_logits_match_and_load_back(tmp_path, norms, gate):
    """gdn-tiny's norms are zero-centred and its shared expert gated as the release's (written as they are);
    plain norms go out as w − 1, an ungated shared expert as a zero gate (0.5) and a doubled down_proj."""
    model, cfg = random_model("gdn-tiny", DENSE_FIRST, norms, gate)
    info = export_hf(model, cfg, tmp_path / "hf")
    assert info["architecture"] == "Qwen3NextForCausalLM"
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["mlp_only_layers"] == [0] and written["rope_parameters"]["partial_rotary_factor"] == 0.25
    x = _ids()
    with torch.no_grad():
        ref = model(x)
    logits, cls = auto_logits(tmp_path / "hf", x)
    assert cls == "Qwen3NextForCausalLM"
    assert (logits - ref).abs().max().item() <= 1e-4
    back = load_model(tmp_path / "hf")
    assert back.cfg.norm_zero_centered and back.cfg.moe.shared_gate
    with torch.no_grad():  # a plain norm's 1 + (w − 1) may round
        assert torch.equal(back(x), ref) if cfg.model.norm_zero_centered else torch.allclose(back(x), ref, atol=1e-6)


def _stock_model():
    """A tiny stock Qwen3NextForCausalLM with braid's config of gdn-tiny, random weights (norms and the
    shared-expert gates off 0)."""
    import transformers

    _, cfg = random_model("gdn-tiny", DENSE_FIRST)
    hf_cfg = hf_config(cfg.model)
    hf_cfg.pop("architectures"), hf_cfg.pop("model_type"), hf_cfg.pop("dtype")
    torch.manual_seed(3)
    stock = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**hf_cfg)).eval()
    with torch.no_grad():
        for name, p in stock.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if name.endswith("shared_expert_gate.weight"):
                p.normal_(0.0, 0.5)  # gates far from 0.5
    return stock


def test_a_checkpoint_the_stock_class_wrote_imports(tmp_path):
    stock = _stock_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock.save_pretrained(tmp_path / "stock")
    model = load_model(tmp_path / "stock")
    x = _ids(seed=2)
    with torch.no_grad():
        assert (model(x) - stock(input_ids=x).logits).abs().max().item() <= 1e-4


def test_partial_rope_round_trips_and_an_odd_channel_count_is_refused():
    """The release's partial_rotary_factor 0.25 is model.rotary_percent (gdn-tiny has it too); a factor
    that leaves no whole pair of channels has no braid equivalent."""
    _, cfg = random_model("gdn-tiny")
    hf = hf_config(cfg.model)
    assert hf["rope_parameters"]["partial_rotary_factor"] == cfg.model.rotary_percent == 0.25
    back = model_config_from_hf(hf)
    assert back.gdn == cfg.model.gdn and back.rotary_percent == 0.25
    hf["rope_parameters"]["partial_rotary_factor"] = 0.3  # 9.6 of head_dim 32
    with pytest.raises(ValueError, match="partial_rotary_factor 0.3"):
        model_config_from_hf(hf)


@pytest.mark.parametrize("override", ["model.attn_gate=headwise",
                                      "model.moe.n_shared_experts=0 model.moe.shared_gate=false",
                                      "model.rotary_percent=0.3",
                                      "model.meta_tokens=2", "model.pattern=GGGG"])
def test_what_the_stock_class_cannot_compute_goes_out_as_remote_code(tmp_path, override):
    model, cfg = random_model("gdn-tiny", *override.split())
    assert export_hf(model, cfg, tmp_path / "hf")["architecture"] == "BraidForCausalLM"


def test_a_trained_expert_bias_goes_out_as_remote_code(tmp_path):
    model, cfg = random_model("gdn-tiny")
    with torch.no_grad():
        model.layers[1].ffn.expert_bias.normal_()
    assert export_hf(model, cfg, tmp_path / "hf")["architecture"] == "BraidForCausalLM"
