"""Triton attention kernels (Triton's interpreter on CPU) against the explicit fp64 reference: forward
(o, lse) and every gradient (q, k, v, FoX gates via c_q/c_k, lse) for causal/full, GQA 1/2/4, windows
smaller and larger than T, sinks, documents, S2, explicit query offsets, odd lengths and head dims,
fp32 and fp16 inputs; outputs and gradients are allocated NaN-poisoned so unwritten elements fail.

Interpreter note: Triton picks the interpreter at import from TRITON_INTERPRET, which conftest.py sets
on machines without CUDA (``braid.kernels.triton`` explains the rule). Shapes are tiny: it is slow.
"""

from __future__ import annotations

import pytest
import torch

from braid.kernels import attention
from braid.kernels.attention_blocked import partial_attention
from braid.kernels.s2 import S2Pattern
from helpers import compile_in_subprocess, interpreter_only, rel_rms
from test_s2 import random_inputs, reference_attention

pytestmark = interpreter_only

# Relative RMS error vs fp64. fp32: ieee dots, fp32 softmax. fp16: inputs, P and dS rounded to fp16
# before the tensor-core dots (as in FlashAttention), so errors of a few 1e-4 are expected.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def check(dtype=torch.float32, *, b=1, t=37, s=None, hq=4, hkv=2, d=16, dv=None, fox=False, docs=False,
          q_offset=None, seed=0, **kw):
    """Triton vs reference for one configuration: o, lse and gradients of (o·dO + lse·dL) w.r.t. q, k, v
    (and c_q, c_k with FoX), each within TOL[dtype] relative RMS error."""
    s = t if s is None else s
    q, k, v, lf, docs_ = random_inputs(b, t, s, hq, hkv, d, dtype=dtype, dv=dv, seed=seed, fox=fox, docs=docs)
    q_offset = s - t if q_offset is None else q_offset
    c = lf.cumsum(1) if fox else None  # c_q = c_k = the gates' cumsum over positions 0..S-1
    c_q = None
    if fox:  # query i sits at position q_offset + i: its c is c_k there (clamped outside 0..S-1)
        c_q = c[:, (q_offset + torch.arange(t)).clamp(0, s - 1)]
    q_doc = None
    if docs:
        q_doc = docs_[:, (q_offset + torch.arange(t)).clamp(0, s - 1)]
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v) + ((c_q, c) if fox else ())]
    cq_, ck_ = (xs[3], xs[4]) if fox else (None, None)
    o, lse = partial_attention(*xs[:3], q_offset=q_offset, q_doc=q_doc, k_doc=docs_, c_q=cq_, c_k=ck_,
                               backend="triton", **kw)
    ref = [x.detach().double().requires_grad_() for x in xs]
    ro, rlse = reference_attention(*ref[:3], q_offset=q_offset, q_doc=q_doc, k_doc=docs_,
                                   c_q=ref[3] if fox else None, c_k=ref[4] if fox else None, **kw)
    assert o.dtype == dtype and lse.dtype == torch.float32
    tol = TOL[dtype]
    assert rel_rms(o, ro) < tol
    fin = rlse.isfinite()
    assert torch.equal(lse.isfinite(), fin)  # −inf exactly where a row sees nothing
    assert rel_rms(lse[fin], rlse[fin]) < tol
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dl = torch.randn(lse.shape, generator=gen, dtype=torch.float64) * fin
    got = torch.autograd.grad((o.double() * do).sum() + (lse.double()[fin] * dl[fin]).sum(), xs)
    want = torch.autograd.grad((ro * do).sum() + (rlse[fin] * dl[fin]).sum(), ref)
    for name, a, w in zip(["dq", "dk", "dv", "dc_q", "dc_k"], got, want):
        assert a.dtype == xs[["dq", "dk", "dv", "dc_q", "dc_k"].index(name)].dtype
        err = rel_rms(a, w) if w.abs().sum() > 0 else float(a.abs().max())
        assert err < tol * 2, f"{name}: rel rms {err:.2e}"


# Each case: one kernel option (or a combination) on lengths that are not multiples of the 16-wide tiles.
FAST = {
    "causal_gqa2": dict(),
    "full_gqa1_t_lt_s": dict(causal=False, hq=2, hkv=2, t=19, s=37),
    "gqa4_window_lt_t_sink": dict(hq=4, hkv=1, window=6, sink=3),
    "fox_docs_window_gt_t": dict(fox=True, docs=True, window=100, t=33),
    "s2_gqa2_fox": dict(s2=S2Pattern(block=8, local_blocks=1, vert_stride=4), fox=True, t=45),
    "offset_docs_sink_odd_dims": dict(q_offset=-5, t=23, s=29, docs=True, sink=2, d=20, dv=12, fox=True),
}
SLOW = {
    "full_window_docs": dict(causal=False, window=7, docs=True, b=2),
    "s2_noncausal_window": dict(s2=S2Pattern(block=4, local_blocks=2, vert_stride=3, offset=1), causal=False,
                                window=20, hq=4, hkv=4),
    "s2_sink_docs_gqa4": dict(s2=S2Pattern(block=16, local_blocks=1, vert_stride=8), hq=8, hkv=2, sink=4,
                              docs=True, t=50),
    "offset_beyond_keys": dict(q_offset=30, t=17, s=33, window=9, fox=True),
    "scale_and_fully_masked_rows": dict(scale=0.3, docs=True, q_offset=-3, t=9, s=20),
}


@pytest.mark.parametrize("name", list(FAST))
def test_fp32_matches_reference(name, poison):
    check(torch.float32, seed=len(name), **FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_fp32_matches_reference_more(name, poison):
    check(torch.float32, seed=len(name), **SLOW[name])


@pytest.mark.parametrize("name", ["s2_gqa2_fox"])
def test_fp16_matches_reference(name, poison):
    check(torch.float16, seed=3, **FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FAST if n != "s2_gqa2_fox"] + list(SLOW))
def test_fp16_matches_reference_more(name, poison):
    cfg = {**FAST, **SLOW}[name]
    check(torch.float16, seed=4, **cfg)


def test_s2_heads_union_covers_the_context():
    """With as many heads as the stride, every causal (query, key) pair is seen by some head: the
    kernel's per-head probabilities (from lse and a one-hot V) sum to nonzero everywhere."""
    pat = S2Pattern(block=4, local_blocks=1, vert_stride=4)
    t = 24
    q, k, _, _, _ = random_inputs(1, t, t, 4, 4, 16)
    v = torch.eye(t)[None, :, None, :16].expand(1, t, 4, 16).contiguous()  # key j → unit vector (j < 16)
    o, _ = partial_attention(q, k, v, q_offset=0, s2=pat, backend="triton")
    seen = (o[0, :, :, :16] > 0).any(1)  # [T, 16]: some head puts weight on key j
    assert torch.equal(seen, torch.ones(t, 16).tril().bool()[:, :16])
    assert not (o[0, :, 0, :16] > 0).equal(seen)  # one head alone does not


def test_public_op_dispatch():
    q, k, v, lf, docs = random_inputs(1, 21, 21, 4, 2, 16, fox=True, docs=True)
    got = attention(q, k, v, log_forget=lf, doc_ids=docs, window=8, return_lse=True, backend="triton")
    want = attention(q, k, v, log_forget=lf, doc_ids=docs, window=8, return_lse=True, backend="torch")
    assert rel_rms(got[0], want[0]) < 1e-5 and rel_rms(got[1], want[1]) < 1e-5
    auto = attention(q, k, v, window=8, backend="auto")  # CPU tensors: the torch path
    assert rel_rms(auto, attention(q, k, v, window=8, backend="torch")) < 1e-7
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        attention(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(ValueError, match="s2"):
        attention(q, k, v, s2=(64, 32, 8))


@pytest.mark.slow  # ahead-of-time compiles of every variant: ~9 s on 2 cores
def test_kernels_compile_for_h100_with_every_option():
    """The interpreter does not type-check like the compiler: compile the real kernels for sm_90
    (no GPU needed) and check they use Hopper tensor-core MMAs without register spills."""
    (stats,) = compile_in_subprocess("attention", [{}])
    for name, st in stats.items():
        assert st["wgmma"] > 0 and st["local"] == 0 and st["fits"], (name, st)


@pytest.mark.slow
def test_kernels_compile_for_gpu_variants():
    variants = [dict(dtype="fp16", d=64, CAUSAL=False, HAS_C=False, HAS_S2=False),
                dict(HAS_WINDOW=False, HAS_DOC=False, HAS_S2=False, HAS_C=False),
                dict(dtype="fp32"), dict(capability=80, d=96)]
    for v, stats in zip(variants, compile_in_subprocess("attention", variants)):
        for name, st in stats.items():
            assert st["local"] == 0 and st["fits"], (v, name, st)
