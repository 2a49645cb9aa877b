"""Gated attention (letter G): equals plain attention when the gate is saturated open (and half of it
when the gate weights are zero), the per-KV-group layout of the widened q projection, causality,
gradcheck, FLOPs, and a tiny "AG" model's training step."""

from __future__ import annotations

import pytest
import torch

from braid.models.attention import Attention
from braid.models.gated_attention import GatedAttention
from braid.models.hybrid import HybridLM
from braid.models.layers import RMSNorm, Rotary, SeqInfo
from braid.models.visible_keys import mean_visible_keys
from helpers import rel_rms, tiny_model_config

TOL = 1e-5
VARIANTS = {
    "headwise": dict(),
    "elementwise": dict(attn_gate="elementwise"),
    "qk_norm": dict(qk_norm=True),
    "window": dict(window=3),
    "mqa_elementwise": dict(n_kv_heads=1, attn_gate="elementwise"),
    "mha_no_rope": dict(n_kv_heads=4, pos_emb="none"),
}


def build(**overrides) -> GatedAttention:
    torch.manual_seed(0)
    return GatedAttention(tiny_model_config(pattern="G", **overrides), layer_idx=0).eval()


def run(mixer, x, doc_ids=None):
    b, t, _ = x.shape
    return mixer(x, SeqInfo(position_ids=torch.arange(t).expand(b, t), doc_ids=doc_ids))


def matching_attention(gated: GatedAttention, o_scale: float = 1.0) -> Attention:
    """An ungated Attention with the gated one's q (gate rows dropped), k, v and o weights."""
    cfg = tiny_model_config(pattern="A", n_heads=gated.n_heads, n_kv_heads=gated.n_kv_heads,
                            qk_norm=gated.q_norm is not None, window=gated.window,
                            pos_emb="rope" if gated.rotary is not None else "none")
    attn = Attention(cfg, layer_idx=0).eval()
    g, hd, e = gated.group, gated.head_dim, gated.gate_dim
    with torch.no_grad():
        w = gated.q_proj.weight.view(gated.n_kv_heads, g * (hd + e), -1)[:, : g * hd]  # layout: [q | gate]
        attn.q_proj.weight.copy_(w.reshape(-1, w.shape[-1]))
        attn.k_proj.weight.copy_(gated.k_proj.weight)
        attn.v_proj.weight.copy_(gated.v_proj.weight)
        attn.o_proj.weight.copy_(gated.o_proj.weight * o_scale)
        if gated.q_norm is not None:
            attn.q_norm.weight.copy_(gated.q_norm.weight)
            attn.k_norm.weight.copy_(gated.k_norm.weight)
    return attn


def force_gate(gated: GatedAttention, value: float):
    """Forward hook on q_proj setting every gate logit (per the documented layout) to ``value``."""
    g, hd = gated.group, gated.head_dim

    def hook(module, args, out):
        out = out.unflatten(-1, (gated.n_kv_heads, -1)).clone()
        out[..., g * hd:] = value
        return out.flatten(-2)

    return gated.q_proj.register_forward_hook(hook)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saturated_gate_equals_attention(variant):
    """Gate logits forced to +30 (sigmoid = 1 in fp32) → exactly ungated attention with the same weights.
    The hook writes the gate slots of the [Hkv, G·D | G·E] layout, so a wrong split fails here."""
    gated = build(**VARIANTS[variant])
    attn = matching_attention(gated)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        handle = force_gate(gated, 30.0)
        out = run(gated, x)
        handle.remove()
        assert rel_rms(out, run(attn, x)) < TOL
        assert rel_rms(run(gated, x), run(attn, x)) > 1e-2  # the real gate does act


@pytest.mark.parametrize("variant", ["headwise", "elementwise", "mqa_elementwise"])
def test_zero_gate_weights_halve_the_output(variant):
    """Gate rows of q_proj set to zero → sigmoid(0) = ½ everywhere, no hook involved."""
    gated = build(**VARIANTS[variant])
    g, hd = gated.group, gated.head_dim
    with torch.no_grad():
        gated.q_proj.weight.view(gated.n_kv_heads, -1, 32)[:, g * hd:] = 0
    attn = matching_attention(gated, o_scale=0.5)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_rms(run(gated, x), run(attn, x)) < TOL


def test_headwise_gate_is_one_scalar_per_head():
    gated = build()
    x = torch.randn(1, 4, 32)
    q, gate = gated._q_and_gate(x)
    assert q.shape == (1, 4, 4, 8) and gate.shape == (1, 4, 4, 1)
    assert gated.q_proj.out_features == 4 * 8 + 4
    assert build(attn_gate="elementwise").q_proj.out_features == 2 * 4 * 8


def test_bad_gate_kind_raises():
    with pytest.raises(ValueError):
        build(attn_gate="channelwise")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("t", [0, 4, 9])
def test_causal(variant, t):
    mixer = build(**VARIANTS[variant])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 32, generator=g)
    x2 = x.clone()
    x2[:, t] = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        out, out2 = run(mixer, x), run(mixer, x2)
    torch.testing.assert_close(out2[:, :t], out[:, :t], rtol=0, atol=1e-6)
    assert (out2[:, t] - out[:, t]).abs().max() > 1e-4


def test_documents_are_isolated():
    mixer = build(attn_gate="elementwise")
    doc_ids = torch.tensor([[0] * 4 + [1] * 5 + [2] * 3])
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 12, 32, generator=g)
    x2 = x.clone()
    x2[0, 4:9] = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        out, out2 = run(mixer, x, doc_ids), run(mixer, x2, doc_ids)
    torch.testing.assert_close(out2[0, :4], out[0, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(out2[0, 9:], out[0, 9:], rtol=0, atol=1e-6)


def test_norm_and_rotary_keep_fp64():
    """gradchecks through mixers need RMSNorm and Rotary to compute fp64 inputs in fp64."""
    x = torch.randn(3, 8, dtype=torch.float64)
    assert rel_rms(RMSNorm(8).double()(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()) < 1e-12
    x = torch.randn(1, 2, 1, 8, dtype=torch.float64)
    y = Rotary(8)(x, torch.arange(2)[None])  # position 1 rotates channel pair (0, D/2) by 1 radian
    c, s = torch.cos(torch.tensor(1.0, dtype=torch.float64)), torch.sin(torch.tensor(1.0, dtype=torch.float64))
    assert abs(float(y[0, 1, 0, 0] - (x[0, 1, 0, 0] * c - x[0, 1, 0, 4] * s))) < 1e-14


def test_a_zero_centered_norm_scales_by_one_plus_its_weight():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, zero_centered=True)
    assert torch.equal(norm.weight, torch.zeros(16))
    with torch.no_grad():
        norm.weight.normal_()
    plain = RMSNorm(16)
    with torch.no_grad():
        plain.weight.copy_(norm.weight + 1)
    assert torch.equal(norm(x), plain(x))
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.zeros(16))


def test_zero_centered_norms_are_refused_with_ngpt():
    """nGPT's connections and final norm are not RMSNorms: the option would do nothing there."""
    from braid.config import load_config
    from braid.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.norm_zero_centered.*ngpt"):
        load_config(None, ["model.preset=llama-tiny", "model.connection=ngpt", "model.norm_zero_centered=true"])


def test_partial_rotary_rotates_the_first_channels_as_a_head_that_size():
    """model.rotary_percent: the first int(D · fraction) channels rotate with the frequencies of a
    head of that many channels (transformers' partial_rotary_factor); the others pass unchanged."""
    x, pos = torch.randn(2, 5, 3, 32, dtype=torch.float64), torch.randint(0, 100, (2, 5))
    y = Rotary(32, 500.0, fraction=0.25)(x, pos)
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert rel_rms(y[..., :8], Rotary(8, 500.0)(x[..., :8], pos)) < 1e-14
    assert rel_rms(y[..., :8], x[..., :8]) > 0.1


@pytest.mark.parametrize("variant,extra", [
    ("headwise", dict(pos_emb="none")),
    ("elementwise", dict(pos_emb="none", window=3)),
    ("headwise", dict(qk_norm=True)),  # RMSNorm + RoPE
], ids=["headwise", "elementwise_window", "qk_norm_rope"])
def test_gradcheck_fp64(variant, extra):
    torch.manual_seed(0)
    cfg = tiny_model_config(pattern="G", d_model=8, n_heads=2, n_kv_heads=1, **VARIANTS[variant], **extra)
    mixer = GatedAttention(cfg, layer_idx=0).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    seq = SeqInfo(position_ids=torch.arange(5)[None], doc_ids=torch.tensor([[0, 0, 0, 1, 1]]))
    assert torch.autograd.gradcheck(lambda x: mixer(x, seq), (x,))


@pytest.mark.parametrize("variant", ["headwise", "elementwise", "window"])
def test_flops_per_token(variant):
    """Projections: 2 FLOPs per weight (every weight is used once per token); mixing: 4·H·D per key."""
    mixer = build(**VARIANTS[variant])
    weights = sum(m.weight.numel() for m in mixer.modules() if isinstance(m, torch.nn.Linear))
    expected = 2 * weights + 4 * 4 * 8 * mean_visible_keys(64, mixer.window)
    assert mixer.flops_per_token(64) == pytest.approx(expected)
    assert mean_visible_keys(4, None) == 2.5 and mean_visible_keys(4, 2) == 1.75


def test_tiny_model_ag_training_step():
    """Pattern "AG": forward/backward, finite loss, every parameter gets a gradient; a few steps learn."""
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config(pattern="AG", qk_norm=True))
    assert isinstance(model.layers[1].mixer, GatedAttention)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (2, 16), generator=g)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9, [0] * 16])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(5):
        loss = model(ids[:, :-1], labels=ids[:, 1:], doc_ids=doc_ids[:, :-1]).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"no gradient reaches {missing}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
