"""The KDA mixer (letter K): an independent reference forward, causality, document isolation,
gradcheck, initialisation, FLOPs, and a tiny HybridLM "KA" that trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from braid.kernels.kda import kda_recurrent
from braid.models.hybrid import HybridLM
from braid.models.kda import KDA, ShortConv
from braid.models.layers import SeqInfo
from helpers import rel_rms, tiny_model_config


def make_mixer(dtype=torch.float64, chunk=8, conv=4, seed=0, **kda_cfg) -> KDA:
    torch.manual_seed(seed)
    cfg = tiny_model_config(pattern="K", d_model=32, n_heads=2)
    cfg.kda.chunk_size, cfg.kda.conv_size = chunk, conv
    for key, value in kda_cfg.items():
        setattr(cfg.kda, key, value)
    mixer = KDA(cfg, 0).to(dtype)
    with torch.no_grad():  # non-trivial gate bias and norm weight so that the reference checks them
        mixer.g_b.bias.normal_()
        mixer.o_norm.weight.uniform_(0.5, 1.5)
    return mixer


def seq_info(b, t, doc_ids=None, meta_tokens=0) -> SeqInfo:
    return SeqInfo(position_ids=torch.arange(t).expand(b, t), doc_ids=doc_ids, meta_tokens=meta_tokens)


def doc_ids_from_lengths(rows: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def reference_forward(m: KDA, x: torch.Tensor) -> torch.Tensor:
    """The layer written out from the formulas, in fp64, with the token-by-token recurrence."""
    b, t, _ = x.shape
    h, hd = m.n_heads, m.head_dim
    x = x.double()
    w = lambda lin: lin.weight.double()  # noqa: E731

    def conv(y, weight):  # y [B, T, C]; out_t = silu(Σ_s weight[:, ks-1-s] · y_{t-s})
        ks = weight.shape[-1]
        out = torch.zeros_like(y)
        for s in range(ks):
            out[:, s:] += y[:, : t - s] * weight[:, 0, ks - 1 - s].double()
        return F.silu(out)

    def l2(y):
        return y / torch.sqrt((y * y).sum(-1, keepdim=True) + 1e-6)

    q = l2(conv(x @ w(m.q_proj).T, m.q_conv.conv.weight).view(b, t, h, hd))
    k = l2(conv(x @ w(m.k_proj).T, m.k_conv.conv.weight).view(b, t, h, hd))
    v = conv(x @ w(m.v_proj).T, m.v_conv.conv.weight).view(b, t, h, hd)
    f = (x @ w(m.f_a).T @ w(m.f_b).T).view(b, t, h, hd) + m.dt_bias.double().view(h, hd)
    g = -m.A_log.double().exp()[:, None] * F.softplus(f)
    beta = torch.sigmoid(x @ w(m.b_proj).T)
    o, _ = kda_recurrent(q, k, v, g, beta)
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + m.o_norm.eps) * m.o_norm.weight.double()
    gate = torch.sigmoid(x @ w(m.g_a).T @ w(m.g_b).T + m.g_b.bias.double()).view(b, t, h, hd)
    return (o * gate).reshape(b, t, h * hd) @ w(m.o_proj).T


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_reference_layer(dtype, tol):
    m = make_mixer(dtype)
    x = torch.randn(2, 27, 32, dtype=dtype)
    out = m(x, seq_info(2, 27))
    assert out.dtype == dtype and out.shape == x.shape
    err = rel_rms(out, reference_forward(m, x))
    assert err < tol, f"rel RMS error {err:.2e}"


@pytest.mark.parametrize("with_docs", [False, True])
def test_causality(with_docs):
    """Changing the hidden state at position t changes no output before t and does change it at t."""
    m = make_mixer(torch.float64)
    b, t, pos = 2, 30, 13
    doc_ids = doc_ids_from_lengths([[9, 21], [30]]) if with_docs else None
    x = torch.randn(b, t, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, pos] += torch.randn(b, 32, dtype=torch.float64)
    y, y2 = m(x, seq_info(b, t, doc_ids)), m(x2, seq_info(b, t, doc_ids))
    assert (y[:, :pos] - y2[:, :pos]).abs().max() < 1e-12
    assert ((y[:, pos] - y2[:, pos]).abs().amax(-1) > 1e-6).all()


def test_documents_are_isolated():
    """Each document of a packed row gives the output it gives alone (convs and state both reset)."""
    m = make_mixer(torch.float64)
    lengths = [11, 3, 20]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    packed = m(x, seq_info(1, x.shape[1], doc_ids_from_lengths([lengths])))
    start = 0
    for n in lengths:
        alone = m(x[:, start:start + n], seq_info(1, n))
        assert rel_rms(packed[:, start:start + n], alone) < 1e-10
        start += n


def test_documents_behind_meta_tokens():
    """With meta tokens in front, each packed document gives what it gives alone behind the same meta
    tokens: state restarts from the state after them, conv taps read the last meta positions (2 meta
    tokens, conv width 4: the first token's farthest tap reads zero padding). Chunk 8: documents
    start mid-chunk, on a chunk edge and span chunks."""
    m, meta = make_mixer(torch.float64), 2
    lengths = [11, 5, 1, 20]
    x_meta = torch.randn(1, meta, 32, dtype=torch.float64)
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    doc = torch.cat([torch.full((1, meta), -1), doc_ids_from_lengths([lengths])], 1)
    packed = m(torch.cat([x_meta, x], 1), seq_info(1, meta + x.shape[1], doc, meta))
    start = 0
    for n in lengths:
        alone = m(torch.cat([x_meta, x[:, start:start + n]], 1), seq_info(1, meta + n, meta_tokens=meta))
        assert rel_rms(packed[:, meta + start:meta + start + n], alone[:, meta:]) < 1e-10, (start, n)
        assert rel_rms(packed[:, :meta], alone[:, :meta]) < 1e-10
        start += n


def test_short_conv_paths_agree():
    """The masked-tap path (used with doc_ids) equals F.conv1d for a single document."""
    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    one_doc = torch.zeros(2, 9, dtype=torch.long)
    assert rel_rms(conv(x, one_doc), conv(x)) < 1e-12
    assert rel_rms(conv(x[:, :2], one_doc[:, :2]), conv(x[:, :2])) < 1e-12  # T < kernel size


def test_gradcheck_mixer_fp64():
    """gradcheck w.r.t. the input, with and without document boundaries (tiny: d 8, 2 heads of 4)."""
    torch.manual_seed(0)
    cfg = tiny_model_config(pattern="K", d_model=8, n_heads=2)
    cfg.kda.chunk_size, cfg.kda.conv_size = 4, 3
    m = KDA(cfg, 0).double()
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: m(y, seq_info(1, 7)), (x,))
    docs = doc_ids_from_lengths([[3, 4]])
    assert torch.autograd.gradcheck(lambda y: m(y, seq_info(1, 7, docs)), (x,))
    meta_docs = torch.tensor([[-1, -1, 0, 1, 1, 1, 1]])  # 2 meta tokens, then documents of 1 and 4 tokens
    assert torch.autograd.gradcheck(lambda y: m(y, seq_info(1, 7, meta_docs, meta_tokens=2)), (x,))


def check_decay_init(m: KDA):
    a = m.A_log.detach().exp()
    assert ((a >= 1 - 1e-6) & (a <= 16 + 1e-5)).all()
    dt = F.softplus(m.dt_bias.detach().double())
    assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all()
    assert m.A_log._no_weight_decay and m.dt_bias._no_weight_decay
    assert a.std() > 0 and dt.std() > 0  # drawn, not constant


def test_init_ranges():
    """A_log = log U(1, 16), softplus(dt_bias) ∈ [1e-3, 0.1]; also after HybridLM's generic init."""
    check_decay_init(make_mixer(torch.float32))
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config(pattern="KA", n_heads=4))
    m = model.layers[0].mixer
    check_decay_init(m)
    assert m.g_b.bias.abs().max() == 0
    assert m.q_conv.conv.weight.abs().max() > 0
    g = -m.A_log.exp()[:, None] * F.softplus(m.dt_bias.view(m.n_heads, m.head_dim))
    assert (g < 0).all()


def test_head_config_and_flops():
    """kda.n_heads / kda.head_dim override the model's; FLOPs count ≥ 2·weights, flat beyond a chunk."""
    m = make_mixer(torch.float32, n_heads=4, head_dim=16, chunk=16)
    assert m.q_proj.out_features == 64 and m.o_norm.weight.shape == (16,)
    out = m(torch.randn(1, 5, 32), seq_info(1, 5))
    assert out.shape == (1, 5, 32)
    weights = sum(lin.weight.numel() for lin in m.modules() if isinstance(lin, torch.nn.Linear))
    assert m.flops_per_token(1) > 2 * weights
    assert m.flops_per_token(16) > m.flops_per_token(8)
    assert m.flops_per_token(4096) == m.flops_per_token(16)


def test_hybrid_lm_trains():
    """A tiny "KA" model: finite loss and gradients everywhere, and a few AdamW steps lower the loss."""
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config(pattern="KA", n_heads=4))
    ids = torch.randint(0, 64, (2, 40))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(5):
        loss = model(ids, labels=ids).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    loss_docs = model(ids, labels=ids, doc_ids=doc_ids_from_lengths([[15, 25], [40]])).mean()
    assert torch.isfinite(loss_docs)


def test_bf16_forward():
    m = make_mixer(torch.bfloat16)
    out = m(torch.randn(2, 20, 32, dtype=torch.bfloat16), seq_info(2, 20))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert math.isfinite(out.float().abs().mean().item())
