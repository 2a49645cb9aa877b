"""HybridLM: outputs and loss, tied head, initialisation, parameter/FLOP counts, vocab resolution,
the layer registry, mixer-only layers and the packed-document contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from braid.config import ModelConfig
from braid.errors import ConfigError
from braid.models import registry
from braid.models.ffn import SwiGLU
from braid.models.hybrid import HybridLM
from braid.models.stats import model_stats, resolve_vocab
from helpers import rel_rms, tiny_model_config

V = 64  # vocab of tiny_model_config


def build(**overrides) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(tiny_model_config(**overrides)).eval()


def random_ids(b=2, t=10, seed=0, vocab=V):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- outputs and loss


def test_logits_shape_and_dtype():
    logits = build()(random_ids(3, 7))
    assert logits.shape == (3, 7, V)
    assert logits.dtype == torch.float32


def test_per_token_loss_is_cross_entropy_of_logits():
    model = build()
    ids, labels = random_ids(2, 10, seed=1), random_ids(2, 10, seed=2)
    with torch.no_grad():
        logits = model(ids)
        loss = model(ids, labels=labels)
    assert loss.shape == (2, 10) and loss.dtype == torch.float32
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 10)
    assert rel_rms(loss, expected) < 1e-6


def test_ignored_labels_give_zero_loss():
    model = build()
    ids, labels = random_ids(2, 10, seed=1), random_ids(2, 10, seed=2)
    labels[0, 3:7] = -100
    labels[1, -1] = -100
    with torch.no_grad():
        loss = model(ids, labels=labels)
    ignored = labels == -100
    assert torch.all(loss[ignored] == 0)
    assert torch.all(loss[~ignored] > 0)


# ----------------------------------------------------------------------------- tied embeddings


def test_tied_embeddings_have_no_lm_head():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.lm_head is None
    assert isinstance(untied.lm_head, nn.Linear)
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == V * 32


def test_tied_head_uses_embedding_weight():
    model = build(tie_embeddings=True)
    captured = {}
    model.norm.register_forward_hook(lambda mod, inp, out: captured.setdefault("h", out))
    with torch.no_grad():
        logits = model(random_ids(seed=3))
    expected = captured["h"] @ model.embed.weight.T
    assert rel_rms(logits, expected) < 1e-6


def test_tied_head_follows_embedding_updates():
    model = build(tie_embeddings=True)
    ids = random_ids(seed=4)
    with torch.no_grad():
        before = model(ids)
        model.embed.weight[V - 1] += 1.0  # a row that also changes the head's output for token V-1
        after = model(ids)
    assert (after[..., V - 1] - before[..., V - 1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- initialisation


@pytest.fixture(scope="module")
def model256() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(ModelConfig(pattern="AAAA", d_model=256, n_heads=4, n_kv_heads=2, vocab_size=512,
                                init_std=0.02))


def _close_to(x: float, target: float, rel: float = 0.1) -> bool:
    return abs(x - target) <= rel * target


def test_init_std_embedding_and_projections(model256):
    std = 0.02
    assert _close_to(model256.embed.weight.std().item(), std)
    assert _close_to(model256.lm_head.weight.std().item(), std)
    for layer in model256.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            w = getattr(layer.mixer, name).weight
            assert _close_to(w.std().item(), std), f"layer {layer.layer_idx} {name} std {w.std().item():.4f}"
        assert _close_to(layer.ffn.gate_proj.weight.std().item(), std)
        assert _close_to(layer.ffn.up_proj.weight.std().item(), std)


def test_init_std_residual_output_projections_scaled(model256):
    out_std = 0.02 / math.sqrt(2 * 4)
    for layer in model256.layers:
        for w in (layer.mixer.o_proj.weight, layer.ffn.down_proj.weight):
            assert _close_to(w.std().item(), out_std), f"layer {layer.layer_idx}: std {w.std().item():.5f}"


def test_init_norms_are_ones(model256):
    norms = [m for m in model256.modules() if type(m).__name__ == "RMSNorm"]
    assert len(norms) == 2 * 4 + 1
    for norm in norms:
        assert torch.all(norm.weight == 1.0)


def test_reset_parameters_restores_init_after_perturbation():
    model = HybridLM(tiny_model_config(qk_norm=True))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    model.reset_parameters()
    norms = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
    assert all(torch.all(n.weight == 1.0) for n in norms)
    assert model.embed.weight.std().item() < 0.1


# ----------------------------------------------------------------------------- parameter and FLOP counts


def test_param_count_equals_built_model():
    for cfg in (tiny_model_config(), tiny_model_config(tie_embeddings=True, qk_norm=True, n_kv_heads=1)):
        torch.manual_seed(0)
        built = HybridLM(cfg)
        stats = model_stats(cfg, seq_len=16)
        assert stats.params == sum(p.numel() for p in built.parameters())
        assert stats.embedding_params == cfg.vocab_size * cfg.d_model


def test_param_count_hand_formula():
    # d 64, 4 query heads and 2 KV heads of 16, 3 layers, vocab 128, untied head.
    cfg = ModelConfig(pattern="AAA", d_model=64, n_heads=4, n_kv_heads=2, vocab_size=128)
    d, hq, hkv, hd, n_layers, vocab = 64, 4, 2, 16, 3, 128
    hidden = 192  # int(8·64/3) = 170 rounded up to ffn_multiple 64
    per_layer = (
        d * hq * hd + 2 * d * hkv * hd + hq * hd * d  # q, k, v, o
        + 3 * d * hidden  # gate, up, down
        + 2 * d  # two RMSNorms
    )
    expected = vocab * d + n_layers * per_layer + d + d * vocab  # embed, layers, final norm, head
    assert model_stats(cfg, seq_len=32).params == expected


def _flops_hand(d, hq, hkv, hd, hidden, n_layers, vocab, mean_visible):
    matmul_params = d * hq * hd + 2 * d * hkv * hd + hq * hd * d + 3 * d * hidden
    per_layer = 2 * matmul_params + 4 * hq * hd * mean_visible
    return 3 * (n_layers * per_layer + 2 * d * vocab)


def test_flops_per_token_causal():
    cfg = ModelConfig(pattern="AAA", d_model=64, n_heads=4, n_kv_heads=2, vocab_size=128)
    seq_len = 16
    mean_visible = (seq_len + 1) / 2  # query t sees t + 1 keys
    expected = _flops_hand(64, 4, 2, 16, 192, 3, 128, mean_visible)
    assert model_stats(cfg, seq_len).flops_per_token == pytest.approx(expected, rel=1e-12)


def test_flops_per_token_window():
    cfg = ModelConfig(pattern="AAA", d_model=64, n_heads=4, n_kv_heads=2, vocab_size=128, window=4)
    seq_len = 16
    mean_visible = (1 + 2 + 3 + 4 * (seq_len - 3)) / seq_len  # capped at 4 keys from position 3 on
    expected = _flops_hand(64, 4, 2, 16, 192, 3, 128, mean_visible)
    assert model_stats(cfg, seq_len).flops_per_token == pytest.approx(expected, rel=1e-12)


def test_flops_window_smaller_than_causal():
    base = dict(pattern="AA", d_model=64, n_heads=4, vocab_size=128)
    causal = model_stats(ModelConfig(**base), 64).flops_per_token
    windowed = model_stats(ModelConfig(**base, window=8), 64).flops_per_token
    assert windowed < causal


# ----------------------------------------------------------------------------- vocab


def test_resolve_vocab_pads_to_multiple():
    cfg = ModelConfig(vocab_multiple=64)
    resolved = resolve_vocab(cfg, 257)
    assert resolved.vocab_size == 320
    assert cfg.vocab_size is None  # the input config is not modified


def test_resolve_vocab_keeps_explicit_size():
    assert resolve_vocab(ModelConfig(vocab_size=300), 257).vocab_size == 300


def test_resolve_vocab_too_small_raises_config_error():
    with pytest.raises(ConfigError, match="vocab_size"):
        resolve_vocab(ModelConfig(vocab_size=200), 257)


def test_unresolved_vocab_cannot_build():
    with pytest.raises(ValueError):
        HybridLM(ModelConfig())


# ----------------------------------------------------------------------------- registry and patterns


@pytest.fixture
def z_mixer():
    # Not Z: tests/test_adding_a_mixer.py registers Z at import, for the whole session.
    assert "X" not in registry._MIXERS

    @registry.register_mixer("X")
    class ScaledLinearMixer(nn.Module):
        """A toy token-wise mixer: one linear map."""

        def __init__(self, cfg, layer_idx):
            super().__init__()
            self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

        def forward(self, x, seq):
            return self.proj(x)

        def flops_per_token(self, seq_len):
            return 2 * self.proj.in_features * self.proj.out_features

    try:
        yield ScaledLinearMixer
    finally:
        del registry._MIXERS["X"]


def test_registered_mixer_builds_in_pattern(z_mixer):
    model = build(pattern="AX")
    assert type(model.layers[0].mixer).__name__ == "Attention"
    assert isinstance(model.layers[1].mixer, z_mixer)
    with torch.no_grad():
        assert model(random_ids(2, 6)).shape == (2, 6, V)


def test_registering_taken_letter_raises():
    with pytest.raises(ValueError):
        @registry.register_mixer("A")
        class Other(nn.Module):
            pass


def test_unknown_letter_raises():
    with pytest.raises(KeyError):
        build(pattern="AQ")


def test_ffn_dash_builds_layer_without_ffn():
    model = build(pattern="AAA", ffn_pattern="S-S")
    assert isinstance(model.layers[0].ffn, SwiGLU)
    assert model.layers[1].ffn is None and model.layers[1].ffn_conn is None
    assert isinstance(model.layers[2].ffn, SwiGLU)
    assert not any("layers.1.ffn" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert model(random_ids(2, 6)).shape == (2, 6, V)


def test_single_ffn_letter_applies_to_all_layers():
    model = build(pattern="AAA", ffn_pattern="-")
    assert all(layer.ffn is None for layer in model.layers)


# ----------------------------------------------------------------------------- packed documents


@pytest.mark.parametrize("overrides", [dict(), dict(window=4, qk_norm=True)], ids=["plain", "window_qknorm"])
def test_packed_document_equals_document_alone(overrides):
    """With RoPE, positions restarting per document and doc_ids, a packed row's second document
    gets exactly the logits it gets when run alone."""
    model = build(pos_emb="rope", **overrides)
    len_a, len_b = 5, 7
    doc_a, doc_b = random_ids(1, len_a, seed=5), random_ids(1, len_b, seed=6)
    packed = torch.cat([doc_a, doc_b], dim=1)
    position_ids = torch.cat([torch.arange(len_a), torch.arange(len_b)])[None]
    doc_ids = torch.cat([torch.zeros(len_a, dtype=torch.long), torch.ones(len_b, dtype=torch.long)])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids, doc_ids=doc_ids)
        alone_b = model(doc_b)
        alone_a = model(doc_a)
    torch.testing.assert_close(packed_logits[:, len_a:], alone_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_logits[:, :len_a], alone_a, rtol=0, atol=1e-5)


def test_packed_without_doc_ids_leaks_across_documents():
    """Counter-check: without doc_ids the second document does see the first."""
    model = build()
    doc_a, doc_b = random_ids(1, 5, seed=5), random_ids(1, 7, seed=6)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed_logits = model(torch.cat([doc_a, doc_b], dim=1), position_ids=position_ids)
        alone_b = model(doc_b)
    assert (packed_logits[:, 5:] - alone_b).abs().max() > 1e-5
