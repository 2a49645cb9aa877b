"""Hugging Face export: every tiny preset's export, loaded by AutoModelForCausalLM, gives braid's logits."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from braid.config import load_config
from braid.convert import load_model, stock_kimi, stock_qwen3_next
from braid.convert.braid_checkpoint import save_braid_checkpoint
from braid.convert.hf_export import export_hf
from braid.models.hybrid import HybridLM
from braid.models.presets import preset_names

VOCAB = 320
TINY = [p for p in preset_names() if p.endswith("-tiny") or p in ("tiny", "tiny-swa")]
STOCK = {"llama-tiny": "LlamaForCausalLM", "tiny": "LlamaForCausalLM", "tiny-swa": "Qwen3ForCausalLM",
         "moe-tiny": "Qwen3MoeForCausalLM"}
HAS_KIMI = stock_kimi.available()
if HAS_KIMI:  # older transformers: the kimi-linear presets go out as remote code
    STOCK["kimi-linear-tiny"] = stock_kimi.KIMI
if stock_qwen3_next.available():
    STOCK["gdn-tiny"] = stock_qwen3_next.QWEN3_NEXT
needs_kimi = pytest.mark.skipif(not HAS_KIMI, reason="this transformers has no KimiLinearForCausalLM")
# The default run covers each stock class and the remote code on Hymba (meta tokens, windows, KV
# sharing, SSM); every other preset runs with -m slow.
FAST = {"llama-tiny", "moe-tiny", "hymba-tiny"}  # tiny-swa (Qwen3) is covered by the sharded test


def random_model(preset: str, *overrides: str, seed: int = 0):
    """A randomly initialised ``preset`` model whose weights are all moved off their init (norm
    weights ≠ 1, biases ≠ 0, ...), so a mis-mapped weight cannot hide; and its config."""
    cfg = load_config(None, [f"model.preset={preset}", f"model.vocab_size={VOCAB}", *overrides])
    torch.manual_seed(seed)
    model = HybridLM(cfg.model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, cfg


def random_run(tmp_path, preset: str, *overrides: str, seed: int = 0):
    """:func:`random_model` and a checkpoint of it."""
    model, cfg = random_model(preset, *overrides, seed=seed)
    ckpt = save_braid_checkpoint(model, cfg, tmp_path / "run", step=7)
    return model, cfg, ckpt


def auto_logits(path, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=x).logits, type(hf).__name__


@pytest.mark.parametrize("preset", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in TINY])
def test_export_parity(tmp_path, preset):
    """Loaded back from the checkpoint (as to-hf does) and exported, the HF model's logits equal
    braid's: max abs diff ≤ 1e-4 in fp32 on CPU; stock class where the architecture matches."""
    model, cfg, ckpt = random_run(tmp_path, preset)
    reloaded = load_model(tmp_path / "run" / "checkpoints" / "latest")
    info = export_hf(reloaded, cfg, tmp_path / "hf")
    assert info["architecture"] == STOCK.get(preset, "BraidForCausalLM")
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    logits, cls = auto_logits(tmp_path / "hf", x)
    assert cls == info["architecture"]
    assert (logits - ref).abs().max().item() <= 1e-4
    # The exported directory also loads back into braid with identical weights.
    back = load_model(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(back(x), reloaded(x))


def test_sharded_export_with_index(tmp_path):
    model, cfg, _ = random_run(tmp_path, "tiny-swa")
    export_hf(model, cfg, tmp_path / "hf", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "hf" / f).is_file() for f in files)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.state_dict().values())
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = auto_logits(tmp_path / "hf", x)
    with torch.no_grad():
        assert (logits - model(x)).abs().max().item() <= 1e-4


def test_export_files_and_bad_input(tmp_path):
    """CLI: config.json, generation_config.json and weights; a non-checkpoint path exits 2, one line."""
    random_run(tmp_path, "llama-tiny")
    out = subprocess.run([sys.executable, "-m", "braid.convert", "to-hf", "--checkpoint",
                          str(tmp_path / "run" / "checkpoints" / "latest"), "--out", str(tmp_path / "hf")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == VOCAB
    assert gen["eos_token_id"] == 256 and gen["do_sample"] is False  # the byte tokenizer's EOS
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "braid.convert", "to-hf", "--checkpoint", str(tmp_path),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "checkpoint" in bad.stderr


@needs_kimi
@pytest.mark.parametrize("eps", ["preset", pytest.param("1e-6", marks=pytest.mark.slow)])
def test_kimi_linear_exports_as_the_stock_class(tmp_path, eps):
    """kimi-linear-tiny (gate_bias=false, as released) → KimiLinearForCausalLM, a trained (non-zero)
    expert bias included, over more than one KDA chunk. transformers builds MLA's kv_a_layernorm with
    eps 1e-6 whatever rms_norm_eps is (the released model and braid use rms_norm_eps = 1e-5): the
    logits differ by ~2e-5 at the preset's eps and only by rounding at 1e-6."""
    model, cfg, _ = random_run(tmp_path, "kimi-linear-tiny", *([] if eps == "preset" else [f"model.norm_eps={eps}"]))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))
    assert not cfg.model.kda.gate_bias and not any(k.endswith("g_b.bias") for k in model.state_dict())
    info = export_hf(model, cfg, tmp_path / "hf")
    assert info["architecture"] == stock_kimi.KIMI
    x = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    logits, cls = auto_logits(tmp_path / "hf", x)
    assert cls == stock_kimi.KIMI
    assert (logits - ref).abs().max().item() <= (1e-4 if eps == "preset" else 2e-5)
    back = load_model(tmp_path / "hf")  # and back into braid, exactly
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


@needs_kimi
def test_kimi_linear_with_gate_bias_stays_remote_code(tmp_path):
    model, cfg, _ = random_run(tmp_path, "kimi-linear-tiny", "model.kda.gate_bias=true")
    assert export_hf(model, cfg, tmp_path / "hf")["architecture"] == "BraidForCausalLM"
