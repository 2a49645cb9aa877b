"""Hymba: the SSM branch against a naive recurrent implementation, KV sharing, causality with meta
tokens and windows, packed documents, init, gradcheck, FLOPs, training, and the Hymba-1.5B size."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from braid.config import ModelConfig
from braid.kernels import attention_blocked
from braid.models.hybrid import HybridLM
from braid.models.hymba import Hymba
from braid.models.layers import SeqInfo
from braid.models.stats import model_stats
from braid.models.visible_keys import mean_visible_keys
from braid.trainer.optim import param_groups
from helpers import rel_rms, tiny_model_config

TOL = 1e-5
attention_op = importlib.import_module("braid.kernels.attention")


def hymba_config(**overrides) -> ModelConfig:
    """d 32, 4 heads (2 KV) of q/k 8, v 16 → 64 attention channels = ssm_inner 64."""
    hy = dict(v_head_dim=16, ssm_inner=64, d_state=4, d_conv=4, dt_rank=4)
    hy.update(overrides.pop("hymba", {}))
    fields = dict(pattern="HHH", d_model=32, n_heads=4, n_kv_heads=2, head_dim=8)
    fields.update(overrides)
    cfg = tiny_model_config(**fields)
    for k, v in hy.items():
        setattr(cfg.hymba, k, v)
    return cfg


def build(layer_idx=0, seed=0, dtype=torch.float32, **overrides) -> Hymba:
    torch.manual_seed(seed)
    layer = Hymba(hymba_config(**overrides), layer_idx).to(dtype)
    with torch.no_grad():  # random (non-unit) norm weights and a non-trivial D, so all are exercised
        for name, p in layer.named_parameters():
            if "layernorm" in name or name in ("D",):
                p.uniform_(0.5, 1.5)
    return layer


def positions(b, t):
    return torch.arange(t).expand(b, t)


# ----------------------------------------------------------------------------- SSM branch


def naive_ssm(layer: Hymba, x, z):
    """The SSM branch written out token by token in fp64 (explicit conv taps and recurrence)."""
    P = {n: p.detach().double() for n, p in layer.named_parameters()}
    x, z = x.double(), z.double()
    b, t, c = x.shape
    k_size, n, r = layer.d_conv, layer.d_state, layer.dt_rank
    w = P["conv1d.weight"][:, 0]  # [C, K]
    eps = layer.dt_layernorm.eps

    def norm(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight

    A = -torch.exp(P["A_log"])
    h = torch.zeros(b, c, n, dtype=torch.float64)
    ys = []
    for i in range(t):
        conv = P["conv1d.bias"].clone().expand(b, c).clone()
        for k in range(k_size):
            if i - k >= 0:
                conv = conv + w[:, k_size - 1 - k] * x[:, i - k]
        xc = conv * torch.sigmoid(conv)
        proj = xc @ P["x_proj.weight"].T
        dt_in, B, C = norm(proj[:, :r], P["dt_layernorm.weight"]), proj[:, r:r + n], proj[:, r + n:]
        B, C = norm(B, P["B_layernorm.weight"]), norm(C, P["C_layernorm.weight"])
        dt = F.softplus(dt_in @ P["dt_proj.weight"].T + P["dt_proj.bias"])
        h = torch.exp(dt[..., None] * A) * h + (dt * xc)[..., None] * B[:, None, :]
        y = (h * C[:, None, :]).sum(-1) + P["D"] * xc
        ys.append(y * F.silu(z[:, i]))
    return torch.stack(ys, 1)


def test_ssm_branch_matches_naive_recurrence():
    layer = build()
    x, z = torch.randn(2, 21, 64), torch.randn(2, 21, 64)
    out = layer.ssm(x, z, SeqInfo(position_ids=positions(2, 21)))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_rms(out, naive_ssm(layer, x, z)) < TOL


def test_ssm_packed_documents_restart():
    """Without meta tokens each document's SSM output equals the document scanned alone."""
    layer = build()
    x, z = torch.randn(1, 20, 64), torch.randn(1, 20, 64)
    doc_ids = torch.tensor([[0] * 6 + [1] * 2 + [2] * 12])
    out = layer.ssm(x, z, SeqInfo(position_ids=positions(1, 20), doc_ids=doc_ids))
    ref = torch.cat([naive_ssm(layer, x[:, a:b], z[:, a:b]) for a, b in ((0, 6), (6, 8), (8, 20))], 1)
    assert rel_rms(out, ref) < TOL


def test_doc_aware_conv_equals_plain_conv_for_one_document():
    layer = build()
    x = torch.randn(2, 11, 64)
    seq = SeqInfo(position_ids=positions(2, 11), doc_ids=torch.zeros(2, 11, dtype=torch.long))
    _, src = layer._doc_layout(seq, 11)
    assert rel_rms(layer._conv(x, src), layer._conv(x, None)) < TOL


# ----------------------------------------------------------------------------- the whole mixer


def test_causal_mixer_with_meta_tokens_and_window():
    layer = build(window=3)
    x = torch.randn(2, 14, 32)
    seq = SeqInfo(position_ids=positions(2, 14), meta_tokens=2)
    base = layer(x, seq)
    for t in (0, 1, 2, 7, 13):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, 32)
        out = layer(x2, SeqInfo(position_ids=positions(2, 14), meta_tokens=2))
        assert torch.allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6), t
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4, t
    # A meta token reaches every later position, even far outside the window (sink and SSM state).
    x2 = x.clone()
    x2[:, 0] += 1.0
    out = layer(x2, SeqInfo(position_ids=positions(2, 14), meta_tokens=2))
    assert (out[:, 13] - base[:, 13]).abs().max() > 1e-5


def test_causal_hybrid_lm_with_meta_tokens_and_window():
    cfg = hymba_config(window=4, global_layers=[0], meta_tokens=2, hymba={"kv_share_groups": [[1, 2]]})
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 5, 15):
            ids2 = ids.clone()
            ids2[:, t] = (ids2[:, t] + 1) % cfg.vocab_size
            out = model(ids2)
            assert torch.allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-5), t
            assert (out[:, t] - base[:, t]).abs().max() > 1e-4, t


def test_kv_sharing_consumer_equals_layer_with_copied_kv():
    cfg = hymba_config(qk_norm=True, hymba={"kv_share_groups": [[1, 2]]})
    torch.manual_seed(0)
    producer, consumer = Hymba(cfg, 1), Hymba(cfg, 2)
    assert producer.stores_kv and consumer.kv_source == 1
    q, kv, rest = 32, 2 * 8 + 2 * 16, 2 * 64  # in_proj rows: [q | k | v | x | z]
    assert consumer.k_norm is None and consumer.in_proj.out_features == producer.in_proj.out_features - kv
    # A layer with its own K/V whose k/v rows (and k_norm) are the producer's, the rest the consumer's.
    plain = Hymba(hymba_config(qk_norm=True), 2)
    with torch.no_grad():
        producer.k_norm.weight.uniform_(0.5, 1.5)
        plain.load_state_dict({k: v for k, v in consumer.state_dict().items() if k != "in_proj.weight"},
                              strict=False)
        plain.in_proj.weight.copy_(torch.cat([consumer.in_proj.weight[:q], producer.in_proj.weight[q:q + kv],
                                              consumer.in_proj.weight[q:q + rest]]))
        plain.k_norm.weight.copy_(producer.k_norm.weight)
    x = torch.randn(2, 10, 32)
    seq = SeqInfo(position_ids=positions(2, 10))
    producer(x, seq)
    assert set(seq.shared) == {1}
    assert rel_rms(consumer(x, seq), plain(x, SeqInfo(position_ids=positions(2, 10)))) < TOL


def test_consumer_without_producer_fails_clearly():
    consumer = Hymba(hymba_config(hymba={"kv_share_groups": [[0, 2]]}), 2)
    with pytest.raises(RuntimeError, match="reuses the K/V of layer 0"):
        consumer(torch.randn(1, 4, 32), SeqInfo(position_ids=positions(1, 4)))


def test_channel_mismatch_and_bad_groups_are_rejected():
    with pytest.raises(ValueError, match="must equal model.hymba.ssm_inner"):
        Hymba(hymba_config(hymba={"v_head_dim": 8}), 0)
    with pytest.raises(ValueError, match="increasing order"):
        Hymba(hymba_config(hymba={"kv_share_groups": [[2, 1]]}), 1)
    with pytest.raises(ValueError, match="not a Hymba layer"):
        Hymba(hymba_config(pattern="AHH", hymba={"kv_share_groups": [[0, 1]]}), 1)


def test_packed_documents_equal_separate_documents():
    """With meta tokens, windows and KV sharing, a packed row gives each document's logits alone."""
    cfg = hymba_config(window=3, global_layers=[0], meta_tokens=3, hymba={"kv_share_groups": [[1, 2]]})
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    lengths = [5, 1, 9]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, doc_ids=doc_ids)
        alone = torch.cat([model(part) for part in ids.split(lengths, 1)], 1)
    assert rel_rms(packed, alone) < TOL


def test_blocked_attention_path(monkeypatch):
    """Long masked sequences take the blocked attention path: same result as SDPA."""
    layer = build(window=3)
    x = torch.randn(1, 12, 32)
    seq = lambda: SeqInfo(position_ids=positions(1, 12), meta_tokens=2)  # noqa: E731
    ref = layer(x, seq())
    monkeypatch.setattr(attention_op, "SDPA_MASK_MAX_PAIRS", 1)
    monkeypatch.setattr(attention_blocked, "BLOCK_Q", 4)
    monkeypatch.setattr(attention_blocked, "BLOCK_K", 4)
    assert rel_rms(layer(x, seq()), ref) < TOL


def test_gradcheck_fp64():
    """Input and every parameter but the two big plain projections (A_log, D, dt_proj, conv, x_proj,
    norms), with packed documents after meta tokens, a window and QK-norm."""
    layer = build(dtype=torch.float64, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, window=2, qk_norm=True,
                  hymba={"v_head_dim": 4, "ssm_inner": 8, "d_state": 2, "d_conv": 3, "dt_rank": 2})
    checked = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()
               if n not in ("in_proj.weight", "out_proj.weight")}
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    seq = SeqInfo(position_ids=positions(1, 7), meta_tokens=2,
                  doc_ids=torch.tensor([[-1, -1, 0, 0, 0, 1, 1]]))

    def fn(inp, *ps):
        return functional_call(layer, dict(zip(checked, ps)), (inp, seq), strict=False)

    assert torch.autograd.gradcheck(fn, (x, *checked.values()), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- init, flops, training


def test_init_after_hybrid_lm_reset():
    cfg = hymba_config()
    torch.manual_seed(0)
    layer = HybridLM(cfg).layers[0].mixer
    assert torch.allclose(layer.A_log, torch.log(torch.arange(1.0, 5.0)).expand(64, 4))
    assert torch.equal(layer.D, torch.ones(64))
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert layer.dt_proj.weight.abs().max() <= layer.dt_rank ** -0.5
    assert layer.conv1d.bias.abs().sum() > 0  # Conv1d's own init, not zeros
    model = HybridLM(cfg)
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    for mixer in (blk.mixer for blk in model.layers):
        assert {id(mixer.A_log), id(mixer.D), id(mixer.dt_proj.bias)} <= no_decay
        assert id(mixer.in_proj.weight) not in no_decay


def test_flops_per_token():
    cfg = hymba_config(window=4, meta_tokens=2, hymba={"kv_share_groups": [[0, 1]]})
    d, inner, n, r, k = 32, 64, 4, 4, 4
    for idx, kv_cols in ((0, 16 + 32), (1, 0)):
        layer = Hymba(cfg, idx)
        proj = d * (32 + kv_cols + 2 * inner) + inner * (r + 2 * n) + r * inner + inner * d
        expected = 2 * (proj + inner * k) + 9 * inner * n + 2 * 4 * (8 + 16) * mean_visible_keys(20, 4, 2)
        assert layer.flops_per_token(20) == pytest.approx(expected)


def test_tiny_hybrid_lm_trains_one_step():
    cfg = hymba_config(window=8, global_layers=[0], meta_tokens=4, hymba={"kv_share_groups": [[1, 2]]})
    torch.manual_seed(0)
    model = HybridLM(cfg)
    assert model.layers[2].mixer.k_dim == 0 and model.layers[1].mixer.stores_kv
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(ids, labels=ids.roll(-1, 1)).mean()
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    for name in ("layers.1.mixer.A_log", "layers.2.mixer.dt_proj.bias", "meta"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), name
    assert torch.isfinite(model(ids, labels=ids.roll(-1, 1)).mean())


def hymba_1_5b_config() -> ModelConfig:
    """Hymba-1.5B as published (Dong et al.): 32 layers, d 1600, 25 heads (5 KV), q/k 64, v 128,
    SwiGLU 5504, SSM inner 3200, d_state 16, d_conv 4, dt_rank 100, 128 meta tokens, vocab 32001, tied."""
    cfg = ModelConfig(pattern="H" * 32, ffn_pattern="S", d_model=1600, n_heads=25, n_kv_heads=5, head_dim=64,
                      ffn_hidden=5504, vocab_size=32001, window=1024, global_layers=[0, 15, 31],
                      meta_tokens=128, tie_embeddings=True)
    cfg.hymba.v_head_dim, cfg.hymba.ssm_inner, cfg.hymba.d_state = 128, 3200, 16
    cfg.hymba.d_conv, cfg.hymba.dt_rank = 4, 100
    cfg.hymba.kv_share_groups = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18],
                                 [19, 20], [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]]
    return cfg


def test_hymba_1_5b_parameter_count():
    stats = model_stats(hymba_1_5b_config(), seq_len=8192)
    assert math.isclose(stats.params, 1.52e9, rel_tol=0.02), stats.params
