"""MLA: an explicit per-head reference (full K/V per head, naive softmax, fp64), RoPE vs NoPE,
causality, gradcheck, FLOPs, and a tiny HybridLM using it."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.func import functional_call

from braid.kernels import attention_blocked
from braid.models.hybrid import HybridLM
from braid.models.layers import SeqInfo
from braid.models.mla import MLA
from braid.models.visible_keys import mean_visible_keys
from helpers import rel_rms, tiny_model_config

TOL = 1e-5
# The module, not the function `braid.kernels.attention` that shadows it as a package attribute.
attention_op = importlib.import_module("braid.kernels.attention")


def mla_config(**overrides):
    mla = dict(n_heads=3, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10)
    mla.update(overrides.pop("mla", {}))
    overrides.setdefault("pattern", "MM")
    overrides.setdefault("d_model", 32)
    cfg = tiny_model_config(**overrides)
    for k, v in mla.items():
        setattr(cfg.mla, k, v)
    return cfg


def build(seed=0, dtype=torch.float32, **overrides) -> MLA:
    torch.manual_seed(seed)
    layer = MLA(mla_config(**overrides), layer_idx=0).to(dtype)
    with torch.no_grad():  # non-trivial norm weights so that they are exercised
        for norm in (layer.kv_a_layernorm, getattr(layer, "q_a_layernorm", None)):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    return layer


def rope_ref(x, pos, theta=10000.0):
    """Rotate-half RoPE written out: pairs (i, i + D/2) rotate by pos · theta^(−2i/D)."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[..., None].double() * freq  # [B, T, D/2]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_mla(layer: MLA, x, pos, *, window=None, sink=0, doc_ids=None, rope=True):
    """Per head h: q_h, k_h = [W_uk_h c | R k_rope], v_h = W_uv_h c, explicit masked softmax (fp64)."""
    W = {n: p.detach().double() for n, p in layer.named_parameters()}
    x = x.double()
    b, t, _ = x.shape
    nope, rd, vd, r = layer.nope_dim, layer.rope_dim, layer.v_dim, layer.kv_lora_rank
    eps = layer.kv_a_layernorm.eps
    if layer.q_lora_rank:
        q_all = rms(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], eps) @ W["q_b_proj.weight"].T
    else:
        q_all = x @ W["q_proj.weight"].T
    down = x @ W["kv_a_proj_with_mqa.weight"].T
    c = rms(down[..., :r], W["kv_a_layernorm.weight"], eps)
    k_rope = down[..., r:]
    if rope:
        k_rope = rope_ref(k_rope[:, :, None], pos)[:, :, 0]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    local = torch.ones(b, t, t, dtype=torch.bool)
    if window is not None:
        local &= (i - j < window)[None]
    if doc_ids is not None:
        local &= doc_ids[:, :, None] == doc_ids[:, None, :]
    visible = (local | (j < sink)[None]) & (j <= i)[None]
    wkv = W["kv_b_proj.weight"].view(layer.n_heads, nope + vd, r)
    outs = []
    for h in range(layer.n_heads):
        q_h = q_all[..., h * (nope + rd):(h + 1) * (nope + rd)]
        q_nope, q_rope = q_h[..., :nope], q_h[..., nope:]
        if rope:
            q_rope = rope_ref(q_rope[:, :, None], pos)[:, :, 0]
        k_h = torch.cat([c @ wkv[h, :nope].T, k_rope], -1)
        v_h = c @ wkv[h, nope:].T
        scores = torch.cat([q_nope, q_rope], -1) @ k_h.transpose(1, 2) / (nope + rd) ** 0.5
        p = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
        outs.append(p @ v_h)
    return torch.cat(outs, -1) @ W["o_proj.weight"].T


def positions(b, t, offset=0):
    return (torch.arange(t) + offset).expand(b, t)


@pytest.mark.parametrize("q_lora", [None, 10])
@pytest.mark.parametrize("rope", [True, False])
def test_matches_per_head_reference(q_lora, rope):
    layer = build(mla={"q_lora_rank": q_lora, "rope": rope})
    assert hasattr(layer, "q_a_proj") == bool(q_lora) and hasattr(layer, "q_proj") == (not q_lora)
    x = torch.randn(2, 11, 32)
    pos = positions(2, 11, offset=3)
    out = layer(x, SeqInfo(position_ids=pos))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_rms(out, reference_mla(layer, x, pos, rope=rope)) < TOL


def test_window_docs_and_sinks_match_reference():
    layer = build(window=4)
    x = torch.randn(2, 14, 32)
    pos = positions(2, 14)
    doc_ids = torch.tensor([[-1, -1] + [0] * 5 + [1] * 7, [-1, -1] + [0] * 9 + [1] * 3])
    out = layer(x, SeqInfo(position_ids=pos, doc_ids=doc_ids, meta_tokens=2))
    ref = reference_mla(layer, x, pos, window=4, sink=2, doc_ids=doc_ids)
    assert rel_rms(out, ref) < TOL


def test_blocked_attention_path(monkeypatch):
    """Long masked sequences take braid's blocked attention instead of SDPA: same result."""
    monkeypatch.setattr(attention_op, "SDPA_MASK_MAX_PAIRS", 1)
    monkeypatch.setattr(attention_blocked, "BLOCK_Q", 4)
    monkeypatch.setattr(attention_blocked, "BLOCK_K", 4)
    layer = build()
    layer.window = 5
    x = torch.randn(1, 13, 32)
    pos = positions(1, 13)
    out = layer(x, SeqInfo(position_ids=pos, meta_tokens=2))
    assert rel_rms(out, reference_mla(layer, x, pos, window=5, sink=2)) < TOL


def test_nope_and_rope_differ_only_by_rotation():
    torch.manual_seed(0)
    rope_layer = build(mla={"rope": True})
    nope_layer = build(mla={"rope": False})
    nope_layer.load_state_dict(rope_layer.state_dict())
    assert rope_layer.rotary is not None and nope_layer.rotary is None
    x = torch.randn(2, 9, 32)
    zero = torch.zeros(2, 9, dtype=torch.long)
    # Position 0 rotates by nothing: identical outputs.
    assert rel_rms(rope_layer(x, SeqInfo(zero)), nope_layer(x, SeqInfo(zero))) < TOL
    # Elsewhere they differ; RoPE depends only on relative positions, NoPE on none at all.
    p0, p7 = positions(2, 9), positions(2, 9, offset=7)
    assert rel_rms(rope_layer(x, SeqInfo(p0)), nope_layer(x, SeqInfo(p0))) > 1e-3
    assert rel_rms(rope_layer(x, SeqInfo(p7)), rope_layer(x, SeqInfo(p0))) < TOL
    assert rel_rms(nope_layer(x, SeqInfo(p7)), nope_layer(x, SeqInfo(zero))) < TOL


def test_pos_emb_none_disables_rotation():
    assert MLA(mla_config(pos_emb="none"), 0).rotary is None


def test_causal():
    layer = build(mla={"q_lora_rank": 10})
    x = torch.randn(2, 12, 32)
    seq = SeqInfo(position_ids=positions(2, 12))
    base = layer(x, seq)
    for t in (0, 5, 11):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, 32)
        out = layer(x2, seq)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4, t


def test_gradcheck_fp64():
    """Input and every parameter, with window, documents and a sink."""
    layer = build(dtype=torch.float64, d_model=8, window=3,
                  mla={"q_lora_rank": 6, "kv_lora_rank": 5, "qk_nope_head_dim": 4,
                       "qk_rope_head_dim": 2, "v_head_dim": 3, "n_heads": 2})
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    seq = SeqInfo(position_ids=positions(1, 6), meta_tokens=1, doc_ids=torch.tensor([[-1, 0, 0, 0, 1, 1]]))

    def fn(inp, *ps):
        return functional_call(layer, dict(zip(names, ps)), (inp, seq))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


def test_flops_per_token():
    layer = build(mla={"q_lora_rank": 10})
    h, qk, v = 3, 14, 10
    proj = 32 * 10 + 10 * h * qk + 32 * (12 + 6) + 12 * h * (8 + v) + h * v * 32
    for t, window in ((16, None), (16, 4)):
        layer.window = window
        visible = mean_visible_keys(t, window)
        assert layer.flops_per_token(t) == pytest.approx(2 * proj + 2 * h * (qk + v) * visible)
    assert mean_visible_keys(4, None) == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4
    assert mean_visible_keys(4, 2) == pytest.approx(1.75)  # (1 + 2 + 2 + 2) / 4
    assert mean_visible_keys(5, 1, sink=2) == pytest.approx((1 + 2 + 3 + 3 + 3) / 5)


def test_hybrid_lm_with_mla_trains():
    cfg = mla_config(pattern="MAM", mla={"q_lora_rank": 8})
    torch.manual_seed(0)
    model = HybridLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = model(ids, labels=ids.roll(-1, 1)).mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].mixer.kv_b_proj.weight.grad.abs().sum() > 0
