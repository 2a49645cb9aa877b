"""S2 strided block-sparse attention: the block pattern against its formula (reference.md), heads'
union covering the context, exact tile skipping, the torch attention path against an explicit fp64
per-head-mask reference (forward and every gradient), work scaling with density, the mixer option."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from braid.kernels import attention
from braid.kernels import attention_blocked as ab
from braid.kernels.s2 import S2Pattern
from helpers import rel_rms, tiny_model_config

# ----------------------------------------------------------------------------- fp64 reference


def s2_block_rule(h, i, j, heads, block_local, stride, offset=0, causal=True) -> bool:
    """reference.md "S2 pattern", written out for one (head, query block, key block)."""
    step = max(1, stride // heads)
    near = (i - j < block_local) if causal else abs(i - j) < block_local
    ok = near or (j + h * step + offset) % stride == 0
    return ok and (j <= i or not causal)


def reference_attention(q, k, v, *, q_offset=None, causal=True, scale=None, window=None, sink=0,
                        q_doc=None, k_doc=None, c_q=None, c_k=None, s2=None):
    """Explicit fp64 attention with a per-head mask built pair by pair from the written-out rules.

    q ``[B,T,Hq,D]``, k/v ``[B,S,Hkv,D/Dv]``; query i at position ``q_offset + i`` (default S − T + i);
    key j visible iff causal_ok ∧ (j < sink ∨ (in_window ∧ same_doc ∧ s2_ok)); logits + c_q[i] − c_k[j]
    off sinks. Returns (o ``[B,T,Hq,Dv]``, lse ``[B,Hq,T]``) in fp64; empty rows give 0 and −inf.
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q_offset = s - t if q_offset is None else q_offset
    g = hq // hkv
    q, k, v = q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if c_q is not None:
        decay = c_q.double().permute(0, 2, 1)[..., None] - c_k.double().permute(0, 2, 1)[:, :, None]
        scores = scores + decay * (torch.arange(s) >= sink)
    p = (q_offset + torch.arange(t))[None, None, :, None]  # query positions [1, 1, T, 1]
    j = torch.arange(s)[None, None, None, :]  # key positions [1, 1, 1, S]
    near = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    if window is not None:
        near = (p - j < window) & ((j - p < window) | causal)
    same = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    if q_doc is not None:
        same = (q_doc[:, :, None] == k_doc[:, None, :])[:, None]
    s2_ok = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    if s2 is not None:  # the written-out rule, vectorised over heads and blocks
        h = torch.arange(hq)[None, :, None, None]
        i_blk, j_blk = torch.div(p, s2.block, rounding_mode="floor"), j // s2.block
        step = max(1, s2.vert_stride // hq)
        local = (i_blk - j_blk < s2.local_blocks) if causal else ((i_blk - j_blk).abs() < s2.local_blocks)
        s2_ok = local | ((j_blk + h * step + s2.offset) % s2.vert_stride == 0)
    allowed = ((j <= p) | (not causal)) & ((j < sink) | (near & same & s2_ok))
    allowed = allowed.expand(b, hq, t, s)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(allowed, torch.exp(scores - lse.masked_fill(lse.isinf(), 0)[..., None]), 0.0)
    return torch.einsum("bhts,bshd->bthd", probs, v), lse


def random_inputs(b, t, s, hq, hkv, d, *, dtype=torch.float32, dv=None, seed=0, fox=False, docs=False):
    """Random q, k, v (+ FoX log gates ``[B,S,Hq]``, + sorted document ids ``[B,S]``)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=gen).to(dtype)
    k = torch.randn(b, s, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, s, hkv, dv or d, generator=gen).to(dtype)
    gate_dtype = torch.promote_types(dtype, torch.float32)  # gates stay fp32 (fp64 for fp64 tests)
    log_forget = None
    if fox:
        log_forget = torch.nn.functional.logsigmoid(torch.randn(b, s, hq, generator=gen) + 2.0).to(gate_dtype)
    doc_ids = torch.randint(0, 3, (b, s), generator=gen).sort(1).values if docs else None
    return q, k, v, log_forget, doc_ids


# ----------------------------------------------------------------------------- the pattern


@pytest.mark.parametrize("heads,block_local,stride,offset", [(4, 2, 4, 0), (8, 1, 8, 3), (3, 2, 8, 1), (16, 3, 8, 0)])
def test_block_rule_matches_formula(heads, block_local, stride, offset):
    pat = S2Pattern(block=4, local_blocks=block_local, vert_stride=stride, offset=offset)
    for causal in (True, False):
        for h, i, j in itertools.product(range(heads), range(12), range(12)):
            assert bool(pat.block_visible(h, i, j, heads, causal)) == s2_block_rule(
                h, i, j, heads, block_local, stride, offset, causal)


@pytest.mark.parametrize("heads,stride", [(8, 8), (16, 8), (4, 4), (12, 8)])
def test_union_of_heads_covers_every_causal_block(heads, stride):
    pat = S2Pattern(block=16, local_blocks=1, vert_stride=stride)
    n = 40
    i, j = torch.arange(n)[None, :, None], torch.arange(n)[None, None, :]
    vis = pat.block_visible(torch.arange(heads)[:, None, None], i, j, heads)
    assert torch.equal(vis.any(0), j[0] <= i[0])  # every causal block, by some head
    assert not vis.all(0)[j[0] <= i[0]].all()  # but no head alone sees everything
    # Tensor parallel: two ranks of half the heads (head_start) reproduce the one-device pattern.
    half = [S2Pattern(block=16, local_blocks=1, vert_stride=stride, n_heads=heads, head_start=r * heads // 2)
            for r in range(2)]
    parts = [p.block_visible(torch.arange(heads // 2)[:, None, None], i, j, heads // 2) for p in half]
    assert torch.equal(torch.cat(parts), vis)


def test_density_falls_with_the_stride():
    dens = [S2Pattern(block=16, local_blocks=2, vert_stride=vs).density(64, 8) for vs in (1, 4, 8)]
    assert dens[0] == 1.0 and dens[0] > dens[1] > dens[2]
    brute = sum(s2_block_rule(h, i, j, 8, 2, 8) for h in range(8) for i in range(64) for j in range(i + 1))
    assert dens[2] == pytest.approx(brute / (8 * 64 * 65 / 2))
    assert 1 / 8 < dens[2] < 1 / 8 + 2 / 64 * 2  # 1/8 vertical + the 2 local blocks of each row


def test_any_visible_is_exact_at_block_granularity():
    rng = random.Random(0)
    for _ in range(300):
        pat = S2Pattern(block=rng.choice([1, 3, 4]), local_blocks=rng.randint(1, 3), vert_stride=rng.randint(1, 6))
        res, causal = rng.randrange(pat.vert_stride), rng.random() < 0.7
        q_lo, k_lo = rng.randint(-5, 40), rng.randint(0, 40)
        q_hi, k_hi = q_lo + rng.randint(0, 9), k_lo + rng.randint(0, 9)
        brute = any(
            (p // pat.block - kk // pat.block < pat.local_blocks if causal
             else abs(p // pat.block - kk // pat.block) < pat.local_blocks)
            or (kk // pat.block + res) % pat.vert_stride == 0
            for p in range(q_lo, q_hi + 1) for kk in range(k_lo, k_hi + 1)
            if not causal or kk // pat.block <= p // pat.block)
        assert pat.any_visible(res, q_lo, q_hi, k_lo, k_hi, causal) == brute


@pytest.mark.parametrize("key,value", [("block", 0), ("local_blocks", 0), ("vert_stride", -1), ("n_heads", 0)])
def test_bad_pattern_raises_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"s2.{key}"):
        S2Pattern(**{key: value})


# ----------------------------------------------------------------------------- the torch path

CASES = {
    "causal_gqa2": dict(hq=4, hkv=2),
    "gqa4_fox_docs_sink": dict(hq=4, hkv=1, fox=True, docs=True, sink=2),
    "window_small_offset": dict(hq=8, hkv=4, window=6, offset=1),
    "non_causal": dict(hq=4, hkv=4, causal=False, window=9),
    "fewer_queries": dict(hq=4, hkv=2, t=11, fox=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torch_path_matches_reference(name):
    c = dict(CASES[name])
    t, s, hq, hkv = c.pop("t", 29), 29, c.pop("hq"), c.pop("hkv")
    pat = S2Pattern(block=4, local_blocks=2, vert_stride=4, offset=c.pop("offset", 0))
    q, k, v, lf, docs = random_inputs(2, t, s, hq, hkv, 8, dtype=torch.float64, fox=c.pop("fox", False),
                                      docs=c.pop("docs", False), seed=len(name))
    xs = [x.requires_grad_() for x in (q, k, v) + ((lf,) if lf is not None else ())]
    o, lse = attention(q, k, v, log_forget=lf, doc_ids=docs, s2=pat, return_lse=True, backend="torch", **c)
    cfull = lf.double().cumsum(1) if lf is not None else None
    ro, rlse = reference_attention(q, k, v, s2=pat, q_doc=None if docs is None else docs[:, s - t:], k_doc=docs,
                                   c_q=None if cfull is None else cfull[:, s - t:], c_k=cfull, **c)
    assert rel_rms(o, ro) < 1e-12
    fin = rlse.isfinite()
    assert torch.equal(lse.isfinite(), fin) and rel_rms(lse[fin], rlse[fin]) < 1e-12
    gen = torch.Generator().manual_seed(1)
    do, dl = torch.randn(o.shape, generator=gen, dtype=o.dtype), torch.randn(lse.shape, generator=gen, dtype=o.dtype)
    got = torch.autograd.grad((o * do).sum() + (lse[fin] * dl[fin]).sum(), xs)
    want = torch.autograd.grad((ro * do).sum() + (rlse[fin] * dl[fin]).sum(), xs)
    for name_, a, b in zip("qkvf", got, want):
        assert rel_rms(a, b) < 1e-10, name_


def test_torch_path_work_scales_with_density(monkeypatch):
    """Tiles computed by the blocked path: with S2 at stride 8 (local 1), about 1/8 of dense."""
    calls = []
    scores = ab._Layout.scores
    monkeypatch.setattr(ab._Layout, "scores", lambda self, *a: calls.append(self.hq) or scores(self, *a))
    q, k, v, _, _ = random_inputs(1, 512, 512, 8, 8, 8)
    attention(q, k, v, return_lse=True, backend="torch")
    dense = sum(calls)  # tiles × heads per tile
    calls.clear()
    pat = S2Pattern(block=16, local_blocks=1, vert_stride=8)
    attention(q, k, v, s2=pat, backend="torch")
    n = 512 // 16
    # Exactly the visible (head, block, block) triples are computed, each a 16×16 tile...
    assert sum(calls) == round(pat.density(n, 8) * 8 * n * (n + 1) / 2)
    # ... which is < 20 % of the dense path's work (its 128-wide tiles, counted in 16×16 units).
    assert sum(calls) < 0.2 * dense * (128 // 16) ** 2


# ----------------------------------------------------------------------------- the mixer option


@pytest.mark.parametrize("letter", ["A", "G", "F"])
def test_mixer_uses_the_s2_pattern(letter):
    from braid.config import S2Config
    from braid.models.layers import SeqInfo
    from braid.models.registry import mixer_class

    cfg = tiny_model_config(pattern=letter * 2, n_heads=4, n_kv_heads=2)
    cfg.s2 = S2Config(enabled=True, block=2, local_blocks=1, vert_stride=4)
    torch.manual_seed(0)
    sparse = mixer_class(letter)(cfg, 0)
    dense = mixer_class(letter)(tiny_model_config(pattern=letter * 2, n_heads=4, n_kv_heads=2), 0)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 24, cfg.d_model)
    seq = SeqInfo(position_ids=torch.arange(24).expand(2, -1))
    y_sparse, y_dense = sparse(x, seq), dense(x, seq)
    assert y_sparse.shape == y_dense.shape
    assert torch.allclose(y_sparse[:, :2], y_dense[:, :2], atol=1e-6)  # the first block is local: same
    assert rel_rms(y_sparse, y_dense) > 1e-3  # later queries lose hidden blocks
    x2 = x.clone()
    x2[:, 5] += 1.0  # causal: earlier outputs unchanged
    assert torch.allclose(sparse(x2, seq)[:, :5], y_sparse[:, :5], atol=1e-6)


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("seed", range(4))
def test_mean_visible_keys_counts_the_pattern_exactly(seed):
    """The closed count (block pairs × token pairs per block distance) equals counting every (head,
    query, key) of the token mask ∧ causal ∧ window, for lengths that do not fill the last block."""
    from braid.models.visible_keys import s2_mean_visible_keys

    rng = random.Random(seed)
    for _ in range(25):
        p = S2Pattern(block=rng.choice([1, 2, 3, 5]), local_blocks=rng.randint(1, 3),
                      vert_stride=rng.randint(1, 5), offset=rng.randint(0, 4))
        t, heads, window = rng.randint(1, 40), rng.randint(1, 6), rng.choice([None, 1, 4, 9, 100])
        pos = torch.arange(t)
        i, j = pos[:, None], pos[None, :]
        keep = p.token_mask(torch.arange(heads), pos, pos, heads) & (j <= i) & (i - j < (window or t))
        assert s2_mean_visible_keys(p, t, heads, window) == pytest.approx(float(keep.sum()) / (heads * t))


@pytest.mark.parametrize("letter", ["A", "G", "F"])
def test_mixer_flops_count_only_visible_blocks(letter):
    """MFU must not credit S2 with dense work: its attention FLOPs follow the pattern's visible keys;
    vert_stride = 1 (every block visible) costs exactly what dense attention costs."""
    from braid.config import S2Config
    from braid.models.registry import mixer_class
    from braid.models.visible_keys import mean_visible_keys, s2_mean_visible_keys

    def build(**s2):
        cfg = tiny_model_config(pattern=letter * 2, n_heads=4, n_kv_heads=2)
        if s2:
            cfg.s2 = S2Config(enabled=True, **s2)
        return mixer_class(letter)(cfg, 0)

    dense, sparse, full = build(), build(block=16, local_blocks=2, vert_stride=4), \
        build(block=16, local_blocks=1, vert_stride=1)
    t = 1024
    attn = 4 * dense.n_heads * dense.head_dim
    assert full.flops_per_token(t) == pytest.approx(dense.flops_per_token(t))
    saved = attn * (mean_visible_keys(t, None) - s2_mean_visible_keys(sparse.s2, t, 4))
    assert dense.flops_per_token(t) - sparse.flops_per_token(t) == pytest.approx(saved)
    assert saved > 0.5 * attn * mean_visible_keys(t, None)  # 2 local + 1/4 of the older blocks
