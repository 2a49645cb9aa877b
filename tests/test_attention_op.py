"""The attention op family (SDPA dispatch and the blocked "flash" torch path) against a naive
explicit-mask fp64 reference, for every option: causal/full, GQA, window, sink, doc_ids, FoX
log_forget, T < S, lse; gradients, gradcheck, fully masked rows, block skipping and memory."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from braid.kernels import attention
from braid.kernels import attention_blocked as ab
from braid.kernels.attention_blocked import blocked_attention, partial_attention
from helpers import rel_rms

TOL = 1e-5

# ----------------------------------------------------------------------------- reference


def reference_attention(q, k, v, *, causal=True, scale=None, log_forget=None, window=None, sink=0,
                        doc_ids=None, q_offset=None, q_doc=None, k_doc=None, c_q=None, c_k=None):
    """Explicit scores → explicit mask → softmax → weighted values, in fp64, K/V repeated for GQA.

    Query ``i`` sits at position ``q_offset + i`` (default ``S − T + i``). Key ``j`` is visible iff
    (not causal or j ≤ pos) and (j < sink or ((window is None or |pos − j| < window, only j ≤ pos
    counted when causal) and same document)). Logits get ``c[pos] − c[j]`` for j ≥ sink (sinks never
    fade), c = cumsum(log_forget) or the given c_q/c_k; doc_ids ``[B,S]`` or separate q_doc/k_doc.
    Returns (o [B,T,Hq,Dv] fp64, lse [B,Hq,T] fp64); rows with nothing visible: 0 and −inf.
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q_offset = s - t if q_offset is None else q_offset
    if doc_ids is not None:
        q_doc, k_doc = doc_ids[:, s - t:], doc_ids
    rep = hq // hkv
    q, k, v = q.double(), k.double().repeat_interleave(rep, 2), v.double().repeat_interleave(rep, 2)
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if log_forget is not None:
        c = log_forget.double().cumsum(1)  # [B, S, Hq]
        c_q, c_k = c[:, s - t:], c
    if c_q is not None:  # sink keys never fade
        decay = c_q.double().permute(0, 2, 1)[..., None] - c_k.double().permute(0, 2, 1)[:, :, None]
        scores = scores + decay * (torch.arange(s) >= sink)

    pos = (q_offset + torch.arange(t))[:, None]  # [T, 1] query positions
    j = torch.arange(s)[None, :]  # [1, S] key positions
    near = torch.ones(t, s, dtype=torch.bool) if window is None else (pos - j < window) & ((j - pos < window) | causal)
    same = torch.ones(1, t, s, dtype=torch.bool) if q_doc is None else q_doc[:, :, None] == k_doc[:, None, :]
    allowed = ((j <= pos) | (not causal)) & ((j < sink) | (near & same))  # [B or 1, T, S]
    allowed = allowed[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # −inf for empty rows
    probs = torch.where(allowed, torch.exp(scores - lse.masked_fill(lse.isinf(), 0)[..., None]), 0.0)
    return torch.einsum("bhts,bshd->bthd", probs, v), lse


def random_inputs(b, t, s, hq, hkv, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g, dtype=dtype)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, s, hkv, d, generator=g, dtype=dtype)
    # FoX gates: log f = logsigmoid(N(1, 1)), mostly mild decay with some strong steps.
    log_forget = F.logsigmoid(torch.randn(b, s, hq, generator=g, dtype=dtype) + 1.0)
    return q, k, v, log_forget


def doc_ids_from_lengths(rows):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def test_reference_options_change_the_result():
    """Guard against a reference that ignores its options: each one changes the output."""
    q, k, v, lf = random_inputs(1, 8, 8, 2, 2, 8)
    docs = doc_ids_from_lengths([[3, 5]])
    pairs = [(dict(), dict(causal=False)), (dict(), dict(window=2)), (dict(), dict(log_forget=lf)),
             (dict(), dict(doc_ids=docs)), (dict(window=2), dict(window=2, sink=1)),
             (dict(doc_ids=docs), dict(doc_ids=docs, sink=1))]
    for a, b in pairs:
        assert rel_rms(reference_attention(q, k, v, **a)[0], reference_attention(q, k, v, **b)[0]) > 1e-2, b


# ----------------------------------------------------------------------------- every combination

S = 13  # not a multiple of the block sizes below
DOCS = [[3, 1, 6, 3], [7, 6]]  # ragged, with a 1-token document
COMBOS = list(itertools.product([True, False], [4, 1], [None, 3], [0, 2], [False, True], [False, True], [S, 6]))


def combo_id(c):
    causal, hkv, window, sink, docs, fox, t = c
    return (f"{'causal' if causal else 'full'}-hkv{hkv}-w{window}-sink{sink}"
            f"{'-docs' if docs else ''}{'-fox' if fox else ''}-T{t}")


def combo_inputs(combo, dtype=torch.float32):
    causal, hkv, window, sink, docs, fox, t = combo
    q, k, v, lf = random_inputs(2, t, S, 4, hkv, 8, seed=COMBOS.index(combo), dtype=dtype)
    kw = dict(causal=causal, window=window, sink=sink,
              doc_ids=doc_ids_from_lengths(DOCS) if docs else None, log_forget=lf if fox else None)
    return q, k, v, kw


@pytest.mark.parametrize("combo", COMBOS, ids=[combo_id(c) for c in COMBOS])
def test_op_matches_reference(combo):
    """The public op (whichever path it dispatches to) and its lse, vs the reference."""
    q, k, v, kw = combo_inputs(combo)
    ref_o, ref_lse = reference_attention(q, k, v, **kw)
    o = attention(q, k, v, **kw)
    o2, lse = attention(q, k, v, return_lse=True, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.dtype == torch.float32
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert rel_rms(o, ref_o) < TOL
    assert rel_rms(o2, ref_o) < TOL
    assert rel_rms(lse, ref_lse) < TOL


@pytest.mark.parametrize("combo", COMBOS, ids=[combo_id(c) for c in COMBOS])
def test_blocked_forward_and_gradients_match_reference(combo):
    """Tiny blocks (4 queries × 5 keys): several blocks per row, ragged edges, skipped blocks."""
    q, k, v, kw = combo_inputs(combo)
    lf = kw.pop("log_forget")
    inputs = [x.clone().requires_grad_() for x in (q, k, v)] + ([lf.clone().requires_grad_()] if lf is not None else [])
    ref_inputs = [x.double().detach().requires_grad_() for x in inputs]
    g = torch.Generator().manual_seed(5)
    w_o, w_lse = torch.randn(q.shape, generator=g), torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=g)

    def loss(fn, xs):
        o, lse = fn(*xs[:3], log_forget=xs[3] if len(xs) > 3 else None, **kw)
        return (o * w_o.to(o.dtype)).sum() + (lse * w_lse.to(lse.dtype)).sum(), o, lse

    out = loss(lambda *a, **b: blocked_attention(*a, block_q=4, block_k=5, **b), inputs)
    ref = loss(reference_attention, ref_inputs)
    assert rel_rms(out[1], ref[1]) < TOL and rel_rms(out[2], ref[2]) < TOL
    grads = torch.autograd.grad(out[0], inputs)
    ref_grads = torch.autograd.grad(ref[0], ref_inputs)
    for name, a, b in zip(["q", "k", "v", "log_forget"], grads, ref_grads):
        assert rel_rms(a, b) < TOL, f"d{name}: rel RMS {rel_rms(a, b):.2e}"


def test_gradcheck_fp64_all_options():
    """torch.autograd.gradcheck through o and lse, with every option on and 2×2 blocks."""
    q, k, v, lf = random_inputs(1, 5, 7, 2, 1, 3, seed=1, dtype=torch.float64)
    docs = doc_ids_from_lengths([[3, 4]])
    xs = [x.requires_grad_() for x in (q, k, v, lf)]

    def fn(q, k, v, lf):
        return blocked_attention(q, k, v, log_forget=lf, window=3, sink=1, doc_ids=docs, block_q=2, block_k=2)

    assert torch.autograd.gradcheck(fn, xs)
    assert torch.autograd.gradcheck(lambda q, k, v, lf: blocked_attention(q, k, v, log_forget=lf, causal=False,
                                                                          block_q=2, block_k=3), xs)


def test_gradcheck_public_op_fp64():
    q, k, v, lf = random_inputs(1, 4, 4, 2, 2, 3, seed=2, dtype=torch.float64)
    xs = [x.requires_grad_() for x in (q, k, v, lf)]
    assert torch.autograd.gradcheck(lambda q, k, v, lf: attention(q, k, v, log_forget=lf, return_lse=True), xs)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, window=2), xs[:3])


# ----------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("kw", [dict(), dict(window=3, sink=2, doc="docs"), dict(fox=True, causal=False)],
                         ids=["causal", "window_sink_docs", "fox_full"])
def test_value_head_dim_may_differ(kw):
    """Hymba: v head dim 2·D. Public op (forward) and blocked path (forward + gradients)."""
    kw = dict(kw)
    q, k, _, lf = random_inputs(2, S, S, 4, 2, 8, seed=12)
    v = torch.randn(2, S, 2, 16)
    if kw.pop("doc", None):
        kw["doc_ids"] = doc_ids_from_lengths(DOCS)
    if kw.pop("fox", None):
        kw["log_forget"] = lf
    ref_o, ref_lse = reference_attention(q, k, v, **kw)
    assert rel_rms(attention(q, k, v, **kw), ref_o) < TOL
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = blocked_attention(*xs, block_q=4, block_k=5, **kw)
    assert o.shape == (2, S, 4, 16) and rel_rms(o, ref_o) < TOL and rel_rms(lse, ref_lse) < TOL
    ref_xs = [x.double().requires_grad_() for x in (q, k, v)]
    w = torch.randn(o.shape)
    grads = torch.autograd.grad((o * w).sum(), xs)
    ref_grads = torch.autograd.grad((reference_attention(*ref_xs, **kw)[0] * w).sum(), ref_xs)
    assert all(rel_rms(a, b) < TOL for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("kw", [dict(), dict(window=4, doc_ids="docs"), dict(causal=False)])
def test_zero_log_forget_equals_plain_attention(kw):
    q, k, v, _ = random_inputs(2, S, S, 4, 2, 8, seed=3)
    if kw.get("doc_ids") == "docs":
        kw = dict(kw, doc_ids=doc_ids_from_lengths(DOCS))
    plain = attention(q, k, v, **kw)  # SDPA
    fox = attention(q, k, v, log_forget=torch.zeros(2, S, 4), **kw)  # blocked
    assert rel_rms(fox, plain) < TOL


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    """partial_attention (the context-parallel entry): queries of a document absent from the K/V
    chunk, and queries before every key, see nothing → o = 0, lse = −inf, finite gradients."""
    q, k, v, lf = random_inputs(2, 6, 8, 4, 2, 8, seed=4)
    c = lf.cumsum(1)
    q_doc = torch.tensor([[0, 0, 9, 9, 1, 1], [1, 1, 1, 1, 1, 1]])
    k_doc = torch.tensor([[0] * 4 + [1] * 4, [0] * 8])  # doc 9 absent; row 1: doc 1 absent
    kw = dict(q_offset=3, q_doc=q_doc, k_doc=k_doc, c_q=c[:, 2:], c_k=c)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = partial_attention(*xs, block_q=2, block_k=3, **kw)
    ref_o, ref_lse = reference_attention(q, k, v, **kw)
    empty = torch.isinf(ref_lse)  # [B, Hq, T]
    assert empty[0, :, 2:4].all() and empty[1].all() and not empty[0, :, :2].any()
    assert torch.isfinite(o).all() and (o.permute(0, 2, 1, 3)[empty] == 0).all()
    assert (lse[empty] == float("-inf")).all()
    assert rel_rms(o, ref_o) < TOL and rel_rms(lse[~empty], ref_lse[~empty]) < TOL
    (o.sum() + lse[~empty].sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)

    # Queries before the first key (negative positions under a causal mask) see nothing either.
    o, lse = partial_attention(q, k, v, q_offset=-6, causal=True)
    assert (o == 0).all() and (lse == float("-inf")).all()


def test_block_skipping_is_sound_and_skips():
    """A skipped block pair never holds a visible (query, key) pair; causal+window skips most pairs."""
    for causal, window, sink, off in itertools.product([True, False], [None, 1, 3, 7], [0, 2, 5], [0, 4, -3]):
        t, s, bq, bk = 10, 14, 3, 2
        vis = ab.visibility(torch.arange(off, off + t), torch.arange(s), causal=causal, window=window, sink=sink)[0]
        for t0 in range(0, t, bq):
            for s0 in range(0, s, bk):
                t1, s1 = min(t0 + bq, t), min(s0 + bk, s)
                if not ab._block_may_be_visible(off + t0, off + t1 - 1, s0, s1 - 1, causal, window, sink):
                    assert not vis[t0:t1, s0:s1].any(), (causal, window, sink, off, t0, s0)
    q = torch.zeros(1, 64, 1, 4)
    lay = ab._Layout(q, q, q, 0, True, 1.0, 8, 0, None, None, 8, 8)
    assert sum(len(ks) for _, _, ks in lay.blocks()) == 8 + 7  # diagonal + one block back


def test_low_precision_inputs_and_autocast():
    """bf16 inputs give bf16 output near the fp64 reference; under CPU autocast the blocked path still
    computes in fp32 (autocast would otherwise run its matmuls in bf16)."""
    q, k, v, lf = random_inputs(2, 16, 16, 4, 2, 16, seed=6)
    ref_o, _ = reference_attention(q, k, v, log_forget=lf, window=5)
    o = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), log_forget=lf, window=5)
    assert o.dtype == torch.bfloat16 and rel_rms(o, ref_o) < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = attention(q, k, v, log_forget=lf, window=5)
    assert o.dtype == torch.float32 and rel_rms(o, ref_o) < TOL


def test_dispatch():
    """SDPA only where exact and cheap: no forget gate, no lse, and no mask or a small one."""
    use = attention_module()._use_sdpa
    common = dict(causal=True, log_forget=None, window=None, sink=0, doc_ids=None, return_lse=False)
    assert use(8192, 8192, **common)  # plain causal: no mask at any length
    assert use(1024, 1024, **dict(common, window=64))
    assert not use(8192, 8192, **dict(common, window=64))
    assert not use(16, 16, **dict(common, log_forget=torch.zeros(1)))
    assert not use(16, 16, **dict(common, return_lse=True))


def attention_module():
    import sys

    return sys.modules["braid.kernels.attention"]


@pytest.mark.parametrize("bad", ["log_forget", "t_gt_s"])
def test_bad_shapes_raise(bad):
    q, k, v, lf = random_inputs(1, 4, 4, 4, 2, 8)
    with pytest.raises(ValueError):
        if bad == "log_forget":
            attention(q, k, v, log_forget=lf[:, :, :2])
        else:
            attention(torch.randn(1, 6, 4, 8), k, v)


# ----------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("kw", [
    dict(log_forget=True, window=256),
    dict(window=256),
    pytest.param(dict(log_forget=True), marks=pytest.mark.slow),  # every causal block: ~10 s
], ids=["fox_window", "window", "fox_full"])
def test_blocked_path_memory_is_linear_in_t(kw):
    """T = 4096 (B = H = 1, D = 16): no saved tensor and no intermediate has anywhere near T² elements."""
    t = 4096
    q, k, v, lf = random_inputs(1, t, t, 1, 1, 16, seed=7)
    if kw.get("log_forget"):
        kw = dict(kw, log_forget=lf.requires_grad_())
    xs = [x.requires_grad_() for x in (q, k, v)]
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with _LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        o = attention(*xs, **kw)  # dispatches to the blocked path (forget gate / T·S above the SDPA limit)
        o.square().sum().backward()
    limit = 64 * t  # a [128, 128] block is 4·t elements; T² would be 4096·t
    assert max(saved) <= limit, f"a saved tensor has {max(saved)} elements"
    assert mode.largest <= limit, f"an intermediate has {mode.largest} elements"
    assert all(torch.isfinite(x.grad).all() for x in xs)
