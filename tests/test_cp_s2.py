"""S2 context parallelism (``cp_kind=s2``) against the one-process op, and its traffic.

* every case of ``test_cp_attention`` with kind ``s2`` (``s2=None`` falls back to ring attention);
* own cases with 8 query heads: dense (stride 1) and sparse patterns, MHA and GQA, a tensor-parallel
  head slice, FoX gates with documents, meta tokens and a window, a 4-token block with Dv ≠ D, a
  window shorter than the stride: outputs and the gradients of q, k, v and the forget gates equal
  ``braid.kernels.attention`` on the whole sequence (fp32, relative RMS ≤ 1e-5); one bf16 case
  (K/V travel in bf16) against the bf16 one-process op at 2e-2;
* the bytes ``comm.COUNTER`` counts in the forward and in the backward equal ``s2_fetch_bytes`` on
  every rank, and a sparse pattern sends less than ring attention measured on the same inputs;
* the fetch plan equals a brute-force token-level visibility reduction (in process, no group).

All cases of one (cp, layout) run in one spawned gloo group; each case is its own test item.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from braid.kernels import attention
from braid.kernels.attention_blocked import visibility
from braid.kernels.s2 import S2Pattern
from braid.parallel.context.layout import CPLayout
from braid.parallel.context.s2_shard import fetch_need, s2_fetch_bytes
from helpers import cp_gather, cp_local, rel_rms
from spawn_group import run_group
from test_cp_attention import CASES, TOL, _check, run_cases

B, T, HQ, D = 2, 32, 8, 8

OWN = {
    "dense-stride1": dict(s2=S2Pattern(block=2, local_blocks=1, vert_stride=1)),
    "sparse-mha": dict(hkv=8, s2=S2Pattern(block=2, local_blocks=1, vert_stride=8)),
    "gqa": dict(hkv=2, s2=S2Pattern(block=2, local_blocks=2, vert_stride=6)),
    "fox-docs-meta-window": dict(hkv=2, fox=True, docs=True, meta=4, window=7,
                                 s2=S2Pattern(block=2, local_blocks=2, vert_stride=3)),
    "tp-heads": dict(hkv=4, s2=S2Pattern(block=2, local_blocks=1, vert_stride=4, offset=1, n_heads=16, head_start=8)),
    "block4-meta-dv": dict(meta=4, dv=12, s2=S2Pattern(block=4, local_blocks=1, vert_stride=2)),
    "window-short": dict(window=2, s2=S2Pattern(block=2, local_blocks=1, vert_stride=4)),
    # bf16 K/V travel in bf16, gates and gradients in fp32: both sides round, so a looser tolerance.
    "bf16-fox-gqa": dict(dtype=torch.bfloat16, tol=2e-2, hkv=2, fox=True,
                         s2=S2Pattern(block=2, local_blocks=2, vert_stride=4)),
}
SPARSE = "sparse-mha"  # also run with ring attention, to compare the measured traffic


def _inputs(case: dict, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    m, hkv, dv = case.get("meta", 0), case.get("hkv", 2), case.get("dv", D)
    s = m + T
    q, k, v = torch.randn(B, s, HQ, D, generator=g), torch.randn(B, s, hkv, D, generator=g), \
        torch.randn(B, s, hkv, dv, generator=g)
    lf = torch.nn.functional.logsigmoid(torch.randn(B, s, HQ, generator=g) + 2) if case.get("fox") else None
    doc = None
    if case.get("docs"):
        doc = torch.cat([torch.full((B, m), -1), torch.cumsum(torch.rand(B, T, generator=g) < 0.15, 1)], 1)
    dtype = case.get("dtype", torch.float32)
    return q.to(dtype), k.to(dtype), v.to(dtype), lf, doc, torch.randn(B, s, HQ, dv, generator=g)


def _sent(counts: dict) -> int:
    return sum(n for label, n in counts.items() if label.startswith(("s2.", "ring.")))


def _run(kind: str, case: dict, group, size: int, layout: str) -> dict:
    """Errors of output and gradients on rank 0, bytes sent by every rank in forward and backward."""
    from braid.parallel.context import ContextParallel
    from braid.parallel.context.comm import COUNTER

    cp = ContextParallel(group, kind, layout)
    m = case.get("meta", 0)
    q, k, v, lf, doc, w = _inputs(case)
    kw = dict(causal=True, sink=m, window=case.get("window"), s2=case["s2"], backend="torch")
    leaves = [x.requires_grad_() for x in (q, k, v) + ((lf,) if lf is not None else ())]
    ref = attention(q, k, v, doc_ids=doc, log_forget=lf, **kw)
    ref_grads = torch.autograd.grad((ref.float() * w).sum(), leaves)
    cps = cp.bind(T // size, m)
    lay = cps.layout
    loc = [None if x is None else cp_local(x.detach(), lay, m) for x in (q, k, v, lf)]
    loc_leaves = [x.requires_grad_() for x in loc if x is not None]
    with COUNTER.counting() as counted:
        o = cps.attention(loc[0], loc[1], loc[2], doc_ids=cp_local(doc, lay, m), log_forget=loc[3], **kw)
    fwd = _sent(counted)
    w_loc = cp_local(w, lay, m)
    w_loc[:, :m] /= size  # meta rows are replicated: each rank carries 1/cp of their loss
    with COUNTER.counting() as counted:
        grads = torch.autograd.grad((o.float() * w_loc).sum(), loc_leaves)
    bwd = _sent(counted)
    o_full = cp_gather(o.detach().float(), lay, m, group)
    o_full[:, :m] /= size
    errs = {"out": rel_rms(o_full, ref.detach())}
    for i, (gl, gr) in enumerate(zip(grads, ref_grads)):
        errs[f"grad{i}"] = rel_rms(cp_gather(gl.float(), lay, m, group), gr)
    sent = [None] * size
    dist.all_gather_object(sent, (fwd, bwd), group=group)
    return {"errs": errs, "fwd": [s[0] for s in sent], "bwd": [s[1] for s in sent]}


def run_s2(layout: str) -> dict:
    """On every rank of the spawned group: the shared CASES with kind s2, then the own cases."""
    group = dist.group.WORLD
    size = dist.get_world_size(group)
    out = {"shared": run_cases("s2", layout), "own": {}}
    for name, case in OWN.items():
        try:
            out["own"][name] = _run("s2", case, group, size, layout)
        except Exception as exc:  # recorded so one broken case does not hide the others
            out["own"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    out["ring"] = _run("ring", OWN[SPARSE], group, size, layout)
    return out


_CACHE: dict = {}


def _results(cp: int, layout: str) -> dict:
    if (cp, layout) not in _CACHE:
        _CACHE[(cp, layout)] = run_group(cp, "test_cp_s2.run_s2", layout)
    return _CACHE[(cp, layout)]


def _expected(case: dict, cp: int, layout: str) -> list[dict]:
    return s2_fetch_bytes(CPLayout(T, cp, 0, layout), case["s2"], batch=B, n_heads=HQ, n_kv_heads=case.get("hkv", 2),
                          head_dim=D, v_head_dim=case.get("dv", D),
                          dtype_bytes=torch.finfo(case.get("dtype", torch.float32)).bits // 8, meta=case.get("meta", 0),
                          window=case.get("window"), fox=bool(case.get("fox")), doc_bytes=8 if case.get("docs") else 0)


def _check_own(cp: int, layout: str, name: str) -> None:
    res = _results(cp, layout)["own"][name]
    assert "error" not in res, res.get("error")
    tol = OWN[name].get("tol", TOL)
    for what, err in res["errs"].items():
        assert err <= tol, f"{what}: rel RMS {err:.2e} > {tol}"
    exp = _expected(OWN[name], cp, layout)
    assert res["fwd"] == [e["fwd_send"] for e in exp], "forward bytes counted ≠ s2_fetch_bytes"
    assert res["bwd"] == [e["bwd_send"] for e in exp], "backward bytes counted ≠ s2_fetch_bytes"


def _check_sparser_than_ring(cp: int, layout: str) -> None:
    res = _results(cp, layout)
    ring = res["ring"]
    _check(ring["errs"])
    s2 = res["own"][SPARSE]
    hkv = OWN[SPARSE]["hkv"]
    ring_kv = (cp - 1) * B * (T // cp) * hkv * 2 * D * 4  # (cp − 1) · local K/V bytes
    assert ring["fwd"] == [ring_kv] * cp
    assert all(s < r for s, r in zip(s2["fwd"], ring["fwd"])), (s2["fwd"], ring["fwd"])


@pytest.mark.parametrize("case", list(CASES))
def test_s2_shared_cases_cp2_zigzag(case):
    _check(_results(2, "zigzag")["shared"][case])


@pytest.mark.parametrize("name", list(OWN))
def test_s2_cp2_zigzag(name):
    _check_own(2, "zigzag", name)


def test_s2_sends_less_than_ring_cp2_zigzag():
    _check_sparser_than_ring(2, "zigzag")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("case", list(CASES))
def test_s2_shared_cases_cp4(case, layout):
    _check(_results(4, layout)["shared"][case])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("name", list(OWN))
def test_s2_cp4(name, layout):
    _check_own(4, layout, name)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_s2_sends_less_than_ring_cp4(layout):
    _check_sparser_than_ring(4, layout)


def _brute_need(lay: CPLayout, meta: int, s2: S2Pattern, window, hq: int, hkv: int) -> torch.Tensor:
    """need[r, g, j] from the token-level mask: some local query of kv head g sees a key of remote block j."""
    keys = torch.arange(lay.seq_len) + meta
    need = torch.zeros(lay.size, hkv, lay.seq_len // s2.block, dtype=torch.bool)
    for r in range(lay.size):
        segs = lay.segments_of(r)
        queries = torch.cat([torch.arange(s.start, s.stop) for s in segs]) + meta
        vis = visibility(queries, keys, causal=True, window=window, sink=0, s2=s2, heads=torch.arange(hq), n_heads=hq)
        per_block = vis[0].any(1).view(hkv, hq // hkv, -1).any(1).view(hkv, -1, s2.block).any(-1)
        for s in segs:
            per_block[:, s.start // s2.block: s.stop // s2.block] = False
        need[r] = per_block
    return need


PLANS = [  # (T, cp, layout, meta, pattern, window, Hq, Hkv)
    *[(T, cp, lay, c.get("meta", 0), c["s2"], c.get("window"), HQ, c.get("hkv", 2))
      for cp in (2, 4) for lay in ("zigzag", "contiguous") for c in OWN.values()],
    (256, 4, "zigzag", 16, S2Pattern(block=8, local_blocks=3, vert_stride=5), 40, 12, 4),
    (256, 4, "contiguous", 0, S2Pattern(block=4, local_blocks=2, vert_stride=16, offset=3), None, 16, 2),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"T{p[0]}-cp{p[1]}-{p[2]}-b{p[4].block}-l{p[4].local_blocks}-"
                                                    f"s{p[4].vert_stride}-w{p[5]}-h{p[6]}/{p[7]}")
def test_fetch_plan_matches_token_mask(plan):
    t, cp, layout, meta, s2, window, hq, hkv = plan
    lay = CPLayout(t, cp, 0, layout)
    need, owner = fetch_need(lay, meta, s2, window, hq, hkv)
    assert torch.equal(need, _brute_need(lay, meta, s2, window, hq, hkv))
    assert need.any()  # the plans above do move something


def test_sparse_pattern_fetches_a_fraction_of_ring():
    """A published-like pattern at 4k tokens on 4 ranks: far less than ring's (cp − 1) · local K/V."""
    lay, s2 = CPLayout(4096, 4, 0, "zigzag"), S2Pattern(block=64, local_blocks=4, vert_stride=8)
    got = s2_fetch_bytes(lay, s2, batch=1, n_heads=8, n_kv_heads=8, head_dim=128, dtype_bytes=2)
    ring = 3 * 1024 * 8 * 2 * 128 * 2
    assert all(r["fwd_send"] < ring / 2 and r["fwd_recv"] < ring / 2 for r in got), got
    assert sum(r["fwd_send"] for r in got) == sum(r["fwd_recv"] for r in got)


def test_block_must_divide_the_chunk():
    with pytest.raises(ValueError, match="model.s2.block"):
        fetch_need(CPLayout(T, 2, 0, "zigzag"), 0, S2Pattern(block=3), None, HQ, 2)
