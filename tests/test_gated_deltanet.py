"""The Gated DeltaNet mixer (letter D): the layer against a token-by-token recurrence written here from
the formula, causality, packed documents (with and without meta tokens), cached decoding, the chunked
path against the recurrent one, initialisation, bad options, and the gdn-tiny preset training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braid.config import load_config
from braid.errors import ConfigError
from braid.kernels.kda import kda, kda_recurrent
from braid.models.decoding import DecodeCache, decode_step
from braid.models.gated_deltanet import GatedDeltaNet
from braid.models.hybrid import HybridLM
from braid.models.layers import SeqInfo
from braid.trainer.trainer import Trainer
from conftest import tiny_overrides
from helpers import rel_rms, tiny_model_config

D = 32


def make_mixer(dtype=torch.float64, n_k=2, n_v=4, dk=8, dv=12, chunk=8, conv=4, seed=0) -> GatedDeltaNet:
    """Grouped heads (2 q/k heads, 4 value heads) and K ≠ V, so the layout and the grouping are tested."""
    torch.manual_seed(seed)
    cfg = tiny_model_config(pattern="D", d_model=D, n_heads=2)
    o = cfg.gdn
    o.n_k_heads, o.n_v_heads, o.head_k_dim, o.head_v_dim, o.chunk_size, o.conv_size = n_k, n_v, dk, dv, chunk, conv
    mixer = GatedDeltaNet(cfg, 0).to(dtype)
    with torch.no_grad():  # a non-trivial norm weight, so that the reference checks it
        mixer.norm.weight.uniform_(0.5, 1.5)
    return mixer


def seq_info(b, t, doc_ids=None, meta_tokens=0) -> SeqInfo:
    return SeqInfo(position_ids=torch.arange(t).expand(b, t), doc_ids=doc_ids, meta_tokens=meta_tokens)


def doc_ids_from_lengths(rows: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def reference_forward(m: GatedDeltaNet, x: torch.Tensor) -> torch.Tensor:
    """The layer in fp64 from Qwen3-Next's formulas, with the scalar-decay delta rule as a loop:
    S ← e^g S;  S ← S + β k (v − Sᵀk)ᵀ;  o = Sᵀ q / √K."""
    b, t, _ = x.shape
    hk, hv, dk, dv = m.n_k_heads, m.n_v_heads, m.head_k_dim, m.head_v_dim
    r = hv // hk
    x = x.double()
    qkvz = (x @ m.in_proj_qkvz.weight.double().T).view(b, t, hk, 2 * dk + 2 * r * dv)
    q, k = qkvz[..., :dk], qkvz[..., dk:2 * dk]
    v, z = qkvz[..., 2 * dk:2 * dk + r * dv], qkvz[..., 2 * dk + r * dv:]
    ba = (x @ m.in_proj_ba.weight.double().T).view(b, t, hk, 2 * r)
    beta, a = torch.sigmoid(ba[..., :r].reshape(b, t, hv)), ba[..., r:].reshape(b, t, hv)

    def conv(y, weight):  # y [B, T, C]; out_t = silu(Σ_s weight[:, ks-1-s] · y_{t-s})
        ks = weight.shape[-1]
        out = torch.zeros_like(y)
        for s in range(ks):
            out[:, s:] += y[:, : t - s] * weight[:, 0, ks - 1 - s].double()
        return F.silu(out)

    def l2(y):
        return y / torch.sqrt((y * y).sum(-1, keepdim=True) + 1e-6)

    q = l2(conv(q.reshape(b, t, -1), m.q_conv.conv.weight).view(b, t, hk, dk))
    k = l2(conv(k.reshape(b, t, -1), m.k_conv.conv.weight).view(b, t, hk, dk))
    v = conv(v.reshape(b, t, -1), m.v_conv.conv.weight).view(b, t, hv, dv)
    g = -m.A_log.double().exp() * F.softplus(a + m.dt_bias.double())
    o = torch.zeros(b, t, hv, dv, dtype=torch.float64)
    for h in range(hv):
        kh = h // r  # value head h reads q/k head h // r
        s = torch.zeros(b, dk, dv, dtype=torch.float64)
        for i in range(t):
            s = torch.exp(g[:, i, h])[:, None, None] * s
            kv = k[:, i, kh]
            err = v[:, i, h] - torch.einsum("bkv,bk->bv", s, kv)
            s = s + beta[:, i, h][:, None, None] * kv[:, :, None] * err[:, None, :]
            o[:, i, h] = torch.einsum("bkv,bk->bv", s, q[:, i, kh]) / dk ** 0.5
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + m.norm.eps) * m.norm.weight.double()
    o = o * F.silu(z.reshape(b, t, hv, dv))
    return o.reshape(b, t, hv * dv) @ m.out_proj.weight.double().T


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_the_recurrence_written_from_the_formula(dtype, tol):
    m = make_mixer(dtype)
    x = torch.randn(2, 21, D, dtype=dtype)  # 21: a partial last chunk of 8
    out = m(x, seq_info(2, 21))
    assert out.dtype == dtype and out.shape == x.shape
    err = rel_rms(out, reference_forward(m, x))
    assert err < tol, f"rel RMS error {err:.2e}"


def test_one_value_head_per_key_head():
    m = make_mixer(n_k=2, n_v=2, dk=8, dv=8)
    x = torch.randn(1, 13, D, dtype=torch.float64)
    assert rel_rms(m(x, seq_info(1, 13)), reference_forward(m, x)) < 1e-10


@pytest.mark.parametrize("with_docs", [False, True])
def test_causality(with_docs):
    """Changing the input at position t changes no output before t and does change it at t."""
    m = make_mixer()
    b, t, pos = 2, 30, 13
    doc_ids = doc_ids_from_lengths([[9, 21], [30]]) if with_docs else None
    x = torch.randn(b, t, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, pos] += torch.randn(b, D, dtype=torch.float64)
    y, y2 = m(x, seq_info(b, t, doc_ids)), m(x2, seq_info(b, t, doc_ids))
    assert (y[:, :pos] - y2[:, :pos]).abs().max() < 1e-12
    assert ((y[:, pos] - y2[:, pos]).abs().amax(-1) > 1e-6).all()


def test_packed_documents_equal_separate_runs():
    m = make_mixer()
    lengths = [11, 3, 1, 20]  # mid-chunk starts, a one-token document, one spanning chunks
    x = torch.randn(1, sum(lengths), D, dtype=torch.float64)
    packed = m(x, seq_info(1, x.shape[1], doc_ids_from_lengths([lengths])))
    start = 0
    for n in lengths:
        alone = m(x[:, start:start + n], seq_info(1, n))
        assert rel_rms(packed[:, start:start + n], alone) < 1e-10, (start, n)
        start += n


def test_packed_documents_behind_meta_tokens():
    """Each packed document gives what it gives alone behind the same meta tokens."""
    m, meta = make_mixer(), 2
    lengths = [11, 5, 20]
    x_meta = torch.randn(1, meta, D, dtype=torch.float64)
    x = torch.randn(1, sum(lengths), D, dtype=torch.float64)
    doc = torch.cat([torch.full((1, meta), -1), doc_ids_from_lengths([lengths])], 1)
    packed = m(torch.cat([x_meta, x], 1), seq_info(1, meta + x.shape[1], doc, meta))
    start = 0
    for n in lengths:
        alone = m(torch.cat([x_meta, x[:, start:start + n]], 1), seq_info(1, meta + n, meta_tokens=meta))
        assert rel_rms(packed[:, meta + start:meta + start + n], alone[:, meta:]) < 1e-10, (start, n)
        start += n


def test_cached_decoding_equals_the_full_forward():
    """A prompt of 5 tokens in one call, then one token at a time, then 3 at once (the chunked path
    from a cached state): the same outputs as one full forward."""
    m = make_mixer()
    x = torch.randn(2, 17, D, dtype=torch.float64)
    full = m(x, seq_info(2, 17))
    cache = m.new_cache(None)
    cuts = [0, 5, *range(6, 15), 17]
    parts = [m(x[:, a:e], seq_info(2, e - a), cache) for a, e in zip(cuts[:-1], cuts[1:])]
    assert cache.state.shape == (2, m.n_v_heads, m.head_k_dim, m.head_v_dim)
    assert rel_rms(torch.cat(parts, 1), full) < 1e-10


def test_model_decodes_token_by_token():
    """Through braid.models.decoding, in a D + attention model with meta tokens."""
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config(pattern="DA", meta_tokens=2)).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(ids)
        cache = DecodeCache()
        steps = [decode_step(model, ids[:, :3], cache)] + [decode_step(model, ids[:, i:i + 1], cache)
                                                          for i in range(3, 9)]
    assert rel_rms(torch.cat(steps, 1), full) < 1e-5


def test_chunked_op_with_a_broadcast_gate_equals_the_recurrent_one():
    """The shared KDA op on a head-wise gate expanded over key channels (a stride-0 view), with
    documents and an initial state: chunked = recurrent, outputs and final state."""
    torch.manual_seed(0)
    b, t, h, dk, dv = 2, 37, 3, 8, 6
    q, k = (F.normalize(torch.randn(b, t, h, dk, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(b, t, h, dv, dtype=torch.float64)
    g = (-torch.rand(b, t, h, dtype=torch.float64) * 2)[..., None].expand(b, t, h, dk)
    beta = torch.rand(b, t, h, dtype=torch.float64)
    s0 = torch.randn(b, h, dk, dv, dtype=torch.float64)
    doc = doc_ids_from_lengths([[10, 27], [37]])
    o, s = kda(q, k, v, g, beta, chunk_size=16, initial_state=s0, output_final_state=True, doc_ids=doc)
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=s0, output_final_state=True, doc_ids=doc)
    assert rel_rms(o, o_ref) < 1e-10 and rel_rms(s, s_ref) < 1e-10


def test_init_and_gradients():
    """A = exp(A_log) ∈ [1, 16], softplus(dt_bias) ∈ [1e-3, 0.1], drawn, no weight decay, also after the
    model's generic init; every parameter gets a finite gradient."""
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config(pattern="DA", n_heads=4))
    m = model.layers[0].mixer
    a, dt = m.A_log.detach().exp(), F.softplus(m.dt_bias.detach().double())
    assert ((a >= 1 - 1e-6) & (a <= 16 + 1e-5)).all() and a.std() > 0
    assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all() and dt.std() > 0
    assert m.A_log._no_weight_decay and m.dt_bias._no_weight_decay
    ids = torch.randint(0, 64, (2, 20))
    model(ids, labels=ids).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_reset_parameters_writes_only_its_decay_parameters():
    m = make_mixer(torch.float32)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.reset_parameters()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"A_log", "dt_bias"}


def test_flops_count_the_weights_and_saturate_at_a_chunk():
    m = make_mixer(torch.float32, chunk=16)
    weights = sum(p.numel() for p in m.parameters() if p.ndim == 2)
    assert m.flops_per_token(1) > 2 * weights
    assert m.flops_per_token(16) > m.flops_per_token(8)
    assert m.flops_per_token(4096) == m.flops_per_token(16)


def test_tp_plan_splits_key_head_groups():
    m = make_mixer(torch.float32)
    plan = m.tp_plan(2)
    assert plan.checks == ((2, "model.gdn.n_k_heads"),)
    assert {n for n, _ in m.named_parameters()} - set(plan.params) == {"norm.weight"}


@pytest.mark.parametrize("override, key", [
    ("model.gdn.n_v_heads=3", "model.gdn.n_v_heads"),  # not a multiple of the 2 key heads
    ("model.gdn.chunk_size=8", "model.gdn.chunk_size"),
    ("model.gdn.head_k_dim=0", "model.gdn.head_k_dim"),
])
def test_bad_options_fail_in_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.pattern=DA", "model.n_heads=2", override])
    assert "\n" not in str(info.value) and f"'{key}'" in str(info.value), str(info.value)


def test_gdn_tiny_preset_trains(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path / "gdn", **{
        "model.preset": "gdn-tiny", "model.d_model": None, "model.n_heads": None, "model.n_kv_heads": None,
        "model.pattern": None, "train.steps": 3, "data.seq_len": 32}) if not o.endswith("=null")]
    cfg = load_config(None, overrides)
    assert "D" in cfg.model.pattern and cfg.model.gdn.n_v_heads > cfg.model.gdn.n_k_heads
    losses = Trainer(cfg).train()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
