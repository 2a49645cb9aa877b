"""FoX (letter F): an open forget gate gives plain NoPE attention, the gated mixer matches an explicit
reference, the key/value shift, causality (with the Pro options), document isolation, gradcheck,
the forget-bias init, FLOPs, and a tiny "FF" model's training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid.config import FoxConfig
from braid.models.attention import Attention
from braid.models.fox import FoX, shift_mix
from braid.models.hybrid import HybridLM
from braid.models.layers import SeqInfo
from braid.models.visible_keys import mean_visible_keys
from helpers import rel_rms, tiny_model_config
from test_attention_op import reference_attention

TOL = 1e-5
PRO = dict(qk_norm=True, fox=FoxConfig(output_gate=True, output_norm=True, kv_shift=True))
VARIANTS = {
    "plain": dict(),
    "rope": dict(fox=FoxConfig(rope=True)),
    "qk_norm": dict(qk_norm=True),
    "kv_shift": dict(fox=FoxConfig(kv_shift=True)),
    "pro": PRO,
    "pro_mqa": dict(PRO, n_kv_heads=1),
    "pro_window": dict(PRO, window=3),
}


def build(**overrides) -> FoX:
    torch.manual_seed(0)
    return FoX(tiny_model_config(pattern="F", **overrides), layer_idx=0).eval()


def run(mixer, x, doc_ids=None, meta_tokens=0):
    b, t, _ = x.shape
    return mixer(x, SeqInfo(position_ids=torch.arange(t).expand(b, t), doc_ids=doc_ids, meta_tokens=meta_tokens))


def docs(*lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


@pytest.mark.parametrize("overrides", [dict(), dict(qk_norm=True), dict(n_kv_heads=1, window=4)],
                         ids=["plain", "qk_norm", "mqa_window"])
@pytest.mark.parametrize("with_docs", [False, True])
def test_open_forget_gate_equals_nope_attention(overrides, with_docs):
    """log f = 0 (bias 1e4, zero weights) → FoX is Attention with pos_emb none and the same weights."""
    fox = build(fox=FoxConfig(forget_bias_init=1e4), **overrides)
    torch.nn.init.zeros_(fox.fgate_proj.weight)
    attn = Attention(tiny_model_config(pattern="A", pos_emb="none", **overrides), layer_idx=0).eval()
    attn.load_state_dict({k: v for k, v in fox.state_dict().items() if not k.startswith("fgate")})
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(1))
    doc_ids = docs(5, 7).expand(2, 12) if with_docs else None
    assert (fox.log_forget(x) == 0).all()
    with torch.no_grad():
        assert rel_rms(run(fox, x, doc_ids), run(attn, x, doc_ids)) < TOL
        torch.nn.init.normal_(fox.fgate_proj.weight)
        torch.nn.init.zeros_(fox.fgate_proj.bias)
        assert rel_rms(run(fox, x, doc_ids), run(attn, x, doc_ids)) > 1e-3  # a real gate acts


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_matches_explicit_reference(n_kv_heads):
    """Projections by hand, per-q-head log f = logsigmoid(W_f x + b_f), the fp64 reference op."""
    fox = build(n_kv_heads=n_kv_heads)
    torch.nn.init.normal_(fox.fgate_proj.bias, 1.0, 1.0)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(2))
    doc_ids = docs(4, 7).expand(2, 11)
    q = (x @ fox.q_proj.weight.T).unflatten(-1, (4, 8))
    k = (x @ fox.k_proj.weight.T).unflatten(-1, (n_kv_heads, 8))
    v = (x @ fox.v_proj.weight.T).unflatten(-1, (n_kv_heads, 8))
    log_f = F.logsigmoid(x @ fox.fgate_proj.weight.T + fox.fgate_proj.bias)
    o, _ = reference_attention(q, k, v, log_forget=log_f, doc_ids=doc_ids)
    expected = o.flatten(2) @ fox.o_proj.weight.double().T
    with torch.no_grad():
        assert rel_rms(run(fox, x, doc_ids), expected) < TOL


def test_shift_mix_matches_loop():
    """k_t = α_t k_{t−1} + (1 − α_t) k_t with k_{−1} = 0 and no mixing across a document start."""
    g = torch.Generator().manual_seed(3)
    x, logits = torch.randn(2, 9, 3, 4, generator=g), torch.randn(2, 9, 3, generator=g)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5] * 9])
    out = shift_mix(x, logits, doc_ids)
    a = torch.sigmoid(logits)[..., None]
    for b in range(2):
        for t in range(9):
            prev = x[b, t - 1] if t > 0 and doc_ids[b, t] == doc_ids[b, t - 1] else torch.zeros(3, 4)
            torch.testing.assert_close(out[b, t], a[b, t] * prev + (1 - a[b, t]) * x[b, t])
    torch.testing.assert_close(shift_mix(x, logits, None)[1], out[1])  # one document = no doc_ids


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("t", [0, 4, 9])
def test_causal(variant, t):
    mixer = build(**VARIANTS[variant])
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 10, 32, generator=g)
    x2 = x.clone()
    x2[:, t] = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        out, out2 = run(mixer, x), run(mixer, x2)
    torch.testing.assert_close(out2[:, :t], out[:, :t], rtol=0, atol=1e-6)
    assert (out2[:, t] - out[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["plain", "pro", "pro_mqa"])
def test_packed_documents_equal_separate_runs(variant):
    """Documents 4 + 5 + 3 packed in one row give exactly what each gives alone (no RoPE: positions
    do not matter), so neither attention, decay nor the kv shift crosses a document start."""
    mixer = build(**VARIANTS[variant])
    x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        packed = run(mixer, x, docs(4, 5, 3))
        for a, b in ((0, 4), (4, 9), (9, 12)):
            assert rel_rms(packed[:, a:b], run(mixer, x[:, a:b])) < TOL
        assert rel_rms(run(mixer, x)[:, 4:], packed[:, 4:]) > 1e-3  # without doc_ids they do mix


def test_meta_tokens_are_sinks():
    """With meta tokens (doc id −1) every document still sees them, and only them, across documents."""
    mixer = build(**PRO)
    x = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(6))
    doc_ids = torch.tensor([[-1, -1, 0, 0, 0, 0, 1, 1, 1, 1]])
    x2 = x.clone()
    x2[0, 2:6] = torch.randn(4, 32)  # change document 0
    with torch.no_grad():
        out, out2 = run(mixer, x, doc_ids, meta_tokens=2), run(mixer, x2, doc_ids, meta_tokens=2)
        torch.testing.assert_close(out2[0, 6:], out[0, 6:], rtol=0, atol=1e-6)
        x3 = x.clone()
        x3[0, 1] = torch.randn(32)  # change a meta token: both documents see it
        out3 = run(mixer, x3, doc_ids, meta_tokens=2)
    assert (out3[0, 2:6] - out[0, 2:6]).abs().max() > 1e-4 and (out3[0, 6:] - out[0, 6:]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["kv_shift_gate", "pro_mqa", "rope"])
def test_gradcheck_fp64(variant):
    overrides = VARIANTS.get(variant, dict(fox=FoxConfig(kv_shift=True, output_gate=True)))
    torch.manual_seed(0)
    cfg = tiny_model_config(pattern="F", d_model=8, n_heads=2, n_kv_heads=overrides.get("n_kv_heads", 2),
                            **{k: v for k, v in overrides.items() if k != "n_kv_heads"})
    mixer = FoX(cfg, layer_idx=0).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64, requires_grad=True)
    seq = SeqInfo(position_ids=torch.arange(6)[None], doc_ids=torch.tensor([[0, 0, 0, 1, 1, 1]]))
    assert torch.autograd.gradcheck(lambda x: mixer(x, seq), (x,))


def test_forget_bias_init():
    """Set in reset_parameters: standalone and after HybridLM's generic init (which zeroes biases)."""
    assert (build(fox=FoxConfig(forget_bias_init=3.0)).fgate_proj.bias == 3.0).all()
    model = HybridLM(tiny_model_config(pattern="FA", fox=FoxConfig(forget_bias_init=-2.0)))
    assert (model.layers[0].mixer.fgate_proj.bias == -2.0).all()
    assert (HybridLM(tiny_model_config(pattern="F")).layers[0].mixer.fgate_proj.bias == 0).all()


@pytest.mark.parametrize("variant", ["plain", "pro", "pro_window"])
def test_flops_per_token(variant):
    mixer = build(**VARIANTS[variant])
    weights = sum(m.weight.numel() for m in mixer.modules() if isinstance(m, torch.nn.Linear))
    expected = 2 * weights + 4 * 4 * 8 * mean_visible_keys(64, mixer.window)
    assert mixer.flops_per_token(64) == pytest.approx(expected)


def test_autocast_bf16_keeps_gate_in_fp32():
    mixer = build(**PRO)
    x = torch.randn(2, 8, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert mixer.log_forget(x).dtype == torch.float32
        out = run(mixer, x)
    assert torch.isfinite(out).all() and rel_rms(out, run(mixer, x).detach()) < 3e-2


@pytest.mark.parametrize("meta_tokens", [0, 2])
def test_tiny_model_ff_pro_training_step(meta_tokens):
    """Pattern "FF" with every Pro option: finite loss, gradients reach every parameter, loss drops."""
    torch.manual_seed(0)
    fox = FoxConfig(output_gate=True, output_norm=True, kv_shift=True, forget_bias_init=2.0)
    model = HybridLM(tiny_model_config(pattern="FF", qk_norm=True, fox=fox, meta_tokens=meta_tokens))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (2, 17), generator=g)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(5):
        loss = model(ids[:, :-1], labels=ids[:, 1:], doc_ids=doc_ids).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, f"no gradient reaches {missing}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
