"""Context-parallel attention against the one-process op: for every cp_kind that serves softmax
attention and every feature (GQA, windows, documents, meta-token sinks, FoX gates, S2, MLA-like
value dims), the local outputs and the gradients of q, k, v and the forget gates equal those of
``braid.kernels.attention`` on the whole sequence (fp32, relative RMS ≤ 1e-5).

All cases of one (kind, cp, layout) run in one spawned gloo group; each case is its own test item.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from braid.kernels import attention
from braid.kernels.s2 import S2Pattern
from helpers import cp_gather, cp_local, rel_rms
from spawn_group import run_group

TOL = 1e-5
B, T = 2, 32

CASES = {
    "plain": dict(),
    "gqa": dict(hkv=1),
    "window": dict(window=5),
    "docs": dict(docs=True),
    "meta-window-docs": dict(meta=4, window=6, docs=True),
    "fox": dict(fox=True),
    "fox-docs-meta": dict(fox=True, docs=True, meta=2),
    "s2": dict(s2=S2Pattern(block=2, local_blocks=2, vert_stride=3, n_heads=4)),
    "dv": dict(dv=12),
}


def _inputs(case: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m, hkv = case.get("meta", 0), case.get("hkv", 2)
    s = m + T
    q = torch.randn(B, s, 4, 8, generator=g)
    k = torch.randn(B, s, hkv, 8, generator=g)
    v = torch.randn(B, s, hkv, case.get("dv", 8), generator=g)
    lf = torch.nn.functional.logsigmoid(torch.randn(B, s, 4, generator=g) + 2) if case.get("fox") else None
    doc = None
    if case.get("docs"):
        doc = torch.cumsum(torch.rand(B, T, generator=g) < 0.15, 1)
        doc = torch.cat([torch.full((B, m), -1), doc], 1)
    w = torch.randn(B, s, 4, case.get("dv", 8), generator=g)  # loss weights: every output matters
    return q, k, v, lf, doc, w


def _kw(case):
    return dict(window=case.get("window"), s2=case.get("s2"))


def run_cases(kind: str, layout: str, node_size=None) -> dict:
    from braid.parallel.context import ContextParallel

    group = dist.group.WORLD
    cp = ContextParallel(group, kind, layout, node_size)
    out = {}
    for name, case in CASES.items():
        try:
            m = case.get("meta", 0)
            q, k, v, lf, doc, w = _inputs(case)
            leaves = [x.requires_grad_() for x in (q, k, v) + ((lf,) if lf is not None else ())]
            ref = attention(q, k, v, causal=True, sink=m, doc_ids=doc, log_forget=lf, backend="torch", **_kw(case))
            ref_grads = torch.autograd.grad((ref * w).sum(), leaves)
            cps = cp.bind(T // cp.size, m)
            lay = cps.layout
            loc = [None if x is None else cp_local(x.detach(), lay, m) for x in (q, k, v, lf)]
            loc_leaves = [x.requires_grad_() for x in loc if x is not None]
            o = cps.attention(loc[0], loc[1], loc[2], causal=True, sink=m, doc_ids=cp_local(doc, lay, m),
                              log_forget=loc[3], backend="torch", **_kw(case))
            w_loc = cp_local(w, lay, m)
            w_loc[:, :m] /= cp.size  # the meta rows are replicated: each rank carries 1/cp of their loss
            grads = torch.autograd.grad((o * w_loc).sum(), loc_leaves)
            o_full = cp_gather(o.detach(), lay, m, group)
            o_full[:, :m] /= cp.size  # every rank computed the meta rows: the sum is cp copies
            errs = {"out": rel_rms(o_full, ref.detach())}
            for i, (gl, gr) in enumerate(zip(grads, ref_grads)):
                errs[f"grad{i}"] = rel_rms(cp_gather(gl, lay, m, group), gr)
            out[name] = errs
        except Exception as exc:  # recorded so one broken case does not hide the others
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


_CACHE: dict = {}


def _results(kind: str, cp: int, layout: str, node_size=None) -> dict:
    key = (kind, cp, layout, node_size)
    if key not in _CACHE:
        _CACHE[key] = run_group(cp, "test_cp_attention.run_cases", kind, layout, node_size)
    return _CACHE[key]


def _check(res: dict) -> None:
    assert "error" not in res, res.get("error")
    for what, err in res.items():
        assert err <= TOL, f"{what}: rel RMS {err:.2e} > {TOL}"


# S2 runs these cases in its own group beside its own ones (tests/test_cp_s2.py).
KINDS = ["ring", "tree", "ulysses"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_cp2_zigzag(kind, case):
    _check(_results(kind, 2, "zigzag")[case])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_cp4(kind, case, layout):
    _check(_results(kind, 4, layout)[case])


def run_ring_bytes() -> dict:
    """Bytes COUNTER saw for one ring layer (forward + backward) next to ``ring_comm_bytes``."""
    from braid.parallel.context import ContextParallel
    from braid.parallel.context.comm import COUNTER
    from braid.parallel.context.ring import ring_comm_bytes

    cp = ContextParallel(dist.group.WORLD, "ring", "zigzag")
    out = {}
    for fox in (False, True):
        case = dict(meta=2, docs=True, fox=fox)
        q, k, v, lf, doc, _ = _inputs(case)
        cps = cp.bind(T // cp.size, 2)
        loc = [None if x is None else cp_local(x, cps.layout, 2).requires_grad_() for x in (q, k, v, lf)]
        with COUNTER.counting() as got:
            cps.attention(*loc[:3], sink=2, doc_ids=cp_local(doc, cps.layout, 2), log_forget=loc[3],
                          backend="torch").sum().backward()
        want = ring_comm_bytes(cp.size, B, T // cp.size, 2, 8, 8, 4, 4, fox=fox, docs=True)
        out[f"fox={fox}"] = [dict(got), want]
    return out


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ring_bytes_equal_the_formula(cp):
    for name, (got, want) in run_group(cp, "test_cp_attention.run_ring_bytes").items():
        assert got == want, name
