"""The attention op against a naive softmax reference, and causality / document isolation of the
attention mixer and the full model."""

from __future__ import annotations

import pytest
import torch

from braid.kernels import attention
from braid.models.attention import Attention
from braid.models.hybrid import HybridLM
from braid.models.layers import SeqInfo
from helpers import rel_rms, tiny_model_config

TOL = 1e-5


# ----------------------------------------------------------------------------- reference


def reference_attention(q, k, v, *, causal=True, scale=None, window=None, doc_ids=None):
    """Explicit scores → mask → softmax → weighted values, in fp64, K/V heads repeated for GQA.

    Query ``i`` sits at key position ``S - T + i``. Key ``j`` is visible iff
    (not causal or j <= pos) and (window is None or pos - j < window) and same document.
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    rep = hq // hkv
    k = k.repeat_interleave(rep, dim=2)  # query head h uses kv head h // rep
    v = v.repeat_interleave(rep, dim=2)
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale

    allowed = torch.zeros(b, t, s, dtype=torch.bool)
    for bi in range(b):
        for i in range(t):
            pos = s - t + i
            for j in range(s):
                ok = True
                if causal and j > pos:
                    ok = False
                if window is not None and pos - j >= window:
                    ok = False
                if doc_ids is not None and doc_ids[bi, pos] != doc_ids[bi, j]:
                    ok = False
                allowed[bi, i, j] = ok
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v)


def random_qkv(b, t, s, hq, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g)
    k = torch.randn(b, s, hkv, d, generator=g)
    v = torch.randn(b, s, hkv, d, generator=g)
    return q, k, v


def doc_ids_from_lengths(rows: list[list[int]]) -> torch.Tensor:
    """``[[3, 1, 4], [8]]`` → per-token document ids of each row (all rows must sum to the same S)."""
    return torch.stack([
        torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)) for lengths in rows
    ])


def check(q, k, v, **kw):
    out = attention(q, k, v, **kw)
    ref = reference_attention(q, k, v, **kw)
    assert out.shape == q.shape
    assert out.dtype == q.dtype
    err = rel_rms(out, ref)
    assert err < TOL, f"rel RMS error {err:.2e} vs reference ({kw})"


# ----------------------------------------------------------------------------- the op


def test_reference_is_not_trivially_masked():
    """Sanity check of the reference itself: causal and non-causal outputs differ."""
    q, k, v = random_qkv(1, 6, 6, 2, 2, 8)
    assert rel_rms(reference_attention(q, k, v, causal=True), reference_attention(q, k, v, causal=False)) > 1e-2


def test_plain_causal():
    check(*random_qkv(2, 9, 9, 4, 4, 16), causal=True)


@pytest.mark.parametrize("hkv", [2, 1])
def test_gqa(hkv):
    check(*random_qkv(2, 9, 9, 4, hkv, 16, seed=hkv), causal=True)


@pytest.mark.parametrize("hkv", [4, 2])
def test_non_causal(hkv):
    check(*random_qkv(2, 7, 7, 4, hkv, 8, seed=10 + hkv), causal=False)


def test_custom_scale():
    check(*random_qkv(2, 8, 8, 4, 2, 8, seed=3), causal=True, scale=0.37)


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8, 20])
def test_sliding_window(window):
    """Window 1 = each query sees only itself; window ≥ T = plain causal."""
    check(*random_qkv(2, 10, 10, 4, 2, 8, seed=window), causal=True, window=window)


def test_window_larger_than_sequence_equals_plain_causal():
    q, k, v = random_qkv(1, 6, 6, 2, 2, 8, seed=4)
    assert rel_rms(attention(q, k, v, window=50), attention(q, k, v)) < TOL


def test_window_one_returns_own_value():
    q, k, v = random_qkv(2, 6, 6, 4, 2, 8, seed=5)
    out = attention(q, k, v, window=1)
    assert rel_rms(out, v.repeat_interleave(2, dim=2)) < TOL


@pytest.mark.parametrize("rows", [
    [[4, 4, 4], [6, 6]],          # regular
    [[3, 1, 6, 2], [7, 5]],       # ragged, with a 1-token document
    [[12], [1, 1, 1, 9]],         # one whole row; several single tokens
])
def test_doc_ids(rows):
    doc_ids = doc_ids_from_lengths(rows)
    q, k, v = random_qkv(2, 12, 12, 4, 2, 8, seed=6)
    check(q, k, v, causal=True, doc_ids=doc_ids)


def test_doc_ids_non_causal():
    doc_ids = doc_ids_from_lengths([[3, 1, 6, 2], [7, 5]])
    check(*random_qkv(2, 12, 12, 4, 2, 8, seed=7), causal=False, doc_ids=doc_ids)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_window_and_doc_ids(window):
    doc_ids = doc_ids_from_lengths([[3, 1, 6, 2], [7, 5]])
    check(*random_qkv(2, 12, 12, 4, 1, 8, seed=8), causal=True, window=window, doc_ids=doc_ids)


@pytest.mark.parametrize("kw", [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, window=3),
    dict(causal=True, doc_ids="ragged"),
    dict(causal=True, window=4, doc_ids="ragged"),
], ids=["causal", "full", "window", "docs", "window+docs"])
def test_fewer_queries_than_keys(kw):
    """T < S: the queries are the last T of the S positions (as when decoding with a cache)."""
    kw = dict(kw)
    if kw.get("doc_ids") == "ragged":
        kw["doc_ids"] = doc_ids_from_lengths([[3, 4, 2, 3], [9, 3]])
    check(*random_qkv(2, 5, 12, 4, 2, 8, seed=9), **kw)


def test_fewer_queries_than_keys_matches_last_rows_of_full():
    q, k, v = random_qkv(2, 12, 12, 4, 2, 8, seed=11)
    full = attention(q, k, v, causal=True, window=4)
    tail = attention(q[:, -5:], k, v, causal=True, window=4)
    assert rel_rms(tail, full[:, -5:]) < TOL


def test_bad_gqa_head_count_raises():
    q, k, v = random_qkv(1, 4, 4, 4, 3, 8)
    with pytest.raises(ValueError):
        attention(q, k, v)


def test_mismatched_k_v_shapes_raise():
    q, k, v = random_qkv(1, 4, 4, 4, 2, 8)
    with pytest.raises(ValueError):
        attention(q, k, v[:, :3])


def test_mismatched_batch_raises():
    q, k, v = random_qkv(2, 4, 4, 4, 2, 8)
    with pytest.raises(ValueError):
        attention(q, k[:1], v[:1])


@pytest.mark.parametrize("shape", [(2, 5), (1, 4), (4,)])
def test_bad_doc_ids_shape_raises(shape):
    q, k, v = random_qkv(2, 4, 4, 4, 2, 8)
    with pytest.raises(ValueError):
        attention(q, k, v, doc_ids=torch.zeros(shape, dtype=torch.long))


# ----------------------------------------------------------------------------- the mixer

MIXER_VARIANTS = {
    "rope": dict(),
    "qk_norm": dict(qk_norm=True),
    "window": dict(window=3),
    "no_pos_emb": dict(pos_emb="none"),
    "mqa": dict(n_kv_heads=1),
}


def build_mixer(**overrides) -> Attention:
    torch.manual_seed(0)
    return Attention(tiny_model_config(**overrides), layer_idx=0).eval()


def run_mixer(mixer, x, doc_ids=None, position_ids=None):
    b, t, _ = x.shape
    if position_ids is None:
        position_ids = torch.arange(t).expand(b, t)
    with torch.no_grad():
        return mixer(x, SeqInfo(position_ids=position_ids, doc_ids=doc_ids))


@pytest.mark.parametrize("variant", list(MIXER_VARIANTS))
@pytest.mark.parametrize("t", [0, 4, 9])
def test_mixer_is_causal(variant, t):
    mixer = build_mixer(**MIXER_VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 32, generator=g)
    x2 = x.clone()
    x2[:, t] = torch.randn(2, 32, generator=g)
    out, out2 = run_mixer(mixer, x), run_mixer(mixer, x2)
    torch.testing.assert_close(out2[:, :t], out[:, :t], rtol=0, atol=1e-6)
    assert (out2[:, t] - out[:, t]).abs().max() > 1e-4, "the changed position's own output did not change"


@pytest.mark.parametrize("variant", ["rope", "window", "no_pos_emb"])
def test_mixer_documents_are_isolated(variant):
    """Row 0 packs documents of lengths 4, 5, 3: changing document 0 or 1 leaves the others alone."""
    mixer = build_mixer(**MIXER_VARIANTS[variant])
    doc_ids = doc_ids_from_lengths([[4, 5, 3], [12]])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 32, generator=g)
    out = run_mixer(mixer, x, doc_ids=doc_ids)
    doc = {0: slice(0, 4), 1: slice(4, 9), 2: slice(9, 12)}

    for changed, untouched in ((0, [1, 2]), (1, [0, 2])):
        x2 = x.clone()
        x2[0, doc[changed]] = torch.randn(x2[0, doc[changed]].shape, generator=g)
        out2 = run_mixer(mixer, x2, doc_ids=doc_ids)
        for other in untouched:
            torch.testing.assert_close(out2[0, doc[other]], out[0, doc[other]], rtol=0, atol=1e-6,
                                       msg=f"changing document {changed} changed document {other}")
        assert (out2[0, doc[changed]] - out[0, doc[changed]]).abs().max() > 1e-4
        torch.testing.assert_close(out2[1], out[1], rtol=0, atol=0)  # the other row is untouched


def test_mixer_without_doc_ids_does_mix_documents():
    """Counter-check for the isolation test: without doc_ids, later tokens do see earlier ones."""
    mixer = build_mixer()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 12, 32, generator=g)
    x2 = x.clone()
    x2[0, :4] = torch.randn(4, 32, generator=g)
    assert (run_mixer(mixer, x2)[0, 4:] - run_mixer(mixer, x)[0, 4:]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- the full model


@pytest.mark.parametrize("overrides", [dict(), dict(window=3, qk_norm=True)], ids=["plain", "window_qknorm"])
@pytest.mark.parametrize("t", [0, 5, 11])
def test_model_logits_are_causal(overrides, t):
    torch.manual_seed(0)
    model = HybridLM(tiny_model_config(**overrides)).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    ids2 = ids.clone()
    ids2[:, t] = (ids[:, t] + 1 + torch.randint(0, 62, (2,), generator=g)) % 64  # always a different token
    with torch.no_grad():
        logits, logits2 = model(ids), model(ids2)
    torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=1e-6)
    assert (logits2[:, t] - logits[:, t]).abs().max() > 1e-5
