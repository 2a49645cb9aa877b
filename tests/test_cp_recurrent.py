"""Context parallelism of the recurrent and locally-mixing ops against the one-process ops: KDA and
the Mamba-1 scan (state passing), short convolutions and the token shift (halo exchange), with
packed documents and meta tokens. The local outputs and the gradients of every input and parameter
equal those of the op on the whole ``[meta, text]`` sequence (fp32, relative RMS ≤ 1e-5).

All cases of one (kind, cp, layout) run in one spawned gloo group; each case is its own test item.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from braid.config import HymbaConfig
from braid.kernels import selective_scan
from braid.models.fox import shift_mix
from braid.models.hymba import Hymba
from braid.models.kda import ShortConv, kda_behind_meta
from braid.models.layers import SeqInfo
from helpers import cp_gather, cp_local, rel_rms, tiny_model_config
from spawn_group import run_group

TOL = 1e-5
B, T = 2, 16
H, K, V, C, N = 2, 4, 6, 8, 3

# op: kda | scan | conv (ShortConv, kernel ks) | shift (FoX token shift) | hymba_conv (doc taps rule).
# With meta tokens and documents, kda and conv follow the K mixer: documents start behind the meta tokens.
CASES = {
    "kda": dict(op="kda"),
    "kda-docs": dict(op="kda", docs=True),
    "kda-meta": dict(op="kda", meta=3),
    "kda-meta-docs-chunk3": dict(op="kda", meta=2, docs=True, chunk=3),
    "kda-meta-docs": dict(op="kda", meta=3, docs=True),
    "scan": dict(op="scan"),
    "scan-docs": dict(op="scan", docs=True),
    "scan-meta": dict(op="scan", meta=3),
    "scan-meta-docs": dict(op="scan", meta=3, docs=True),
    "conv-docs-meta": dict(op="conv", ks=4, meta=2, docs=True),
    "conv-wide": dict(op="conv", ks=7, meta=2),  # halo longer than a segment and than the meta prefix
    "conv-wide-docs-meta": dict(op="conv", ks=7, meta=3, docs=True),
    "shift-docs-meta": dict(op="shift", meta=2, docs=True),
    "shift": dict(op="shift"),
    "hymba-conv-docs-meta": dict(op="hymba_conv", meta=3, docs=True),
    "hymba-conv-wide": dict(op="hymba_conv", meta=1, docs=True, d_conv=6),
    # The Triton kernels (interpreted on CPU) with initial states and their gradients, against torch.
    "kda-meta-docs-triton": dict(op="kda", meta=2, docs=True, chunk=16, backend="triton"),
    "scan-meta-docs-triton": dict(op="scan", meta=3, docs=True, backend="triton"),
}


def _doc_ids(g, m):
    doc = torch.rand(B, T, generator=g) < 0.2
    doc[:, T // 4] = True  # a document starting exactly at a segment start
    doc[1, T // 2 - 1] = True  # and one on the last token of a segment
    doc = doc.cumsum(1)
    return torch.cat([torch.full((B, m), -1), doc], 1)


def _setup(case: dict, seed: int = 0):
    """(inputs: list of leaves [B, M+T, ...], params: list of leaves, fn(*inputs, doc) → out, doc)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m, s, op = case.get("meta", 0), case.get("meta", 0) + T, case["op"]
    doc = _doc_ids(g, m) if case.get("docs") else None
    if op == "kda":
        q = F.normalize(torch.randn(B, s, H, K, generator=g), dim=-1)
        k = F.normalize(torch.randn(B, s, H, K, generator=g), dim=-1)
        v = torch.randn(B, s, H, V, generator=g)
        g_ = -torch.rand(B, s, H, K, generator=g) * 0.5
        beta = torch.rand(B, s, H, generator=g)
        return [q, k, v, g_, beta], [], dict(chunk_size=case.get("chunk", 4)), doc
    if op == "scan":
        u = torch.randn(B, s, C, generator=g)
        dt = F.softplus(torch.randn(B, s, C, generator=g))
        bb, cc = torch.randn(B, s, N, generator=g), torch.randn(B, s, N, generator=g)
        z = torch.randn(B, s, C, generator=g)
        a = -torch.rand(C, N, generator=g) - 0.1
        d = torch.randn(C, generator=g)
        return [u, dt, bb, cc, z], [a, d], {}, doc
    if op == "conv":
        return [torch.randn(B, s, C, generator=g)], [], ShortConv(C, case["ks"]), doc
    if op == "shift":
        return [torch.randn(B, s, H, K, generator=g), torch.randn(B, s, H, generator=g)], [], {}, doc
    cfg = tiny_model_config(pattern="H", hymba=HymbaConfig(ssm_inner=C, d_state=N, dt_rank=2,
                                                            d_conv=case.get("d_conv", 4)), n_heads=2, n_kv_heads=1)
    layer = Hymba(cfg, 0)
    with torch.no_grad():
        layer.conv1d.bias.normal_()
    return [torch.randn(B, s, C, generator=g)], [], layer, doc


def _scan_ref(u, dt, bb, cc, z, a, d, doc, m):
    """Hymba's cp = 1 scan: one scan without documents; with documents, restarts from the state
    after the meta tokens."""
    if doc is None:
        return selective_scan(u, dt, a, bb, cc, d, z, backend="torch")
    reset = torch.ones_like(doc, dtype=torch.bool)
    reset[:, 1:] = doc[:, 1:] != doc[:, :-1]
    if not m:
        return selective_scan(u, dt, a, bb, cc, d, z, reset=reset, backend="torch")
    y0, h = selective_scan(u[:, :m], dt[:, :m], a, bb[:, :m], cc[:, :m], d, z[:, :m], output_final_state=True)
    y1 = selective_scan(u[:, m:], dt[:, m:], a, bb[:, m:], cc[:, m:], d, z[:, m:], initial_state=h,
                        reset=reset[:, m:])
    return torch.cat([y0, y1], 1)


def _apply(case, extra, xs, params, doc, cps=None):
    """The op on the whole sequence (cps None) or through ``cps`` on local tensors."""
    op, m = case["op"], case.get("meta", 0)
    if op == "kda":
        if cps is None:
            return kda_behind_meta(*xs, m, doc, backend="torch", **extra)
        return cps.kda(*xs, doc_ids=doc, backend=case.get("backend", "torch"), **extra)
    if op == "scan":
        u, dt, bb, cc, z = xs
        a, d = params
        if cps is None:
            return _scan_ref(u, dt, bb, cc, z, a, d, doc, m)
        return cps.selective_scan(u, dt, a, bb, cc, d, z, doc_ids=doc, backend=case.get("backend", "torch"))
    if op == "conv":
        def fn(x, dp):
            return extra(x, dp, meta_tokens=m)
        n = extra.kernel_size - 1
    elif op == "shift":
        fn, n = shift_mix, 1
    else:
        layer = extra

        def fn(x, dp):
            return layer._conv(x, layer._doc_layout(SeqInfo(position_ids=None, doc_ids=dp, meta_tokens=m),
                                                    x.shape[1])[1])
        n = layer.d_conv - 1
    return fn(*xs, doc) if cps is None else cps.local_mix(fn, n, *xs, doc)


def run_cases(kind: str, layout: str) -> dict:
    from braid.parallel.context import ContextParallel
    from braid.parallel.context.comm import COUNTER

    group = dist.group.WORLD
    cp = ContextParallel(group, kind, layout)
    out = {}
    for name, case in CASES.items():
        try:
            m = case.get("meta", 0)
            xs, params, extra, doc = _setup(case)
            mod = getattr(extra, "conv1d", extra)  # a Hymba layer: only its conv is used here
            mod_params = list(mod.parameters()) if isinstance(mod, torch.nn.Module) else []
            params = [p.requires_grad_() for p in params] + mod_params
            xs = [x.requires_grad_() for x in xs]
            ref = _apply(case, extra, xs, params, doc)
            w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
            ref_grads = torch.autograd.grad((ref * w).sum(), xs + params)
            cps = cp.bind(T // cp.size, m)
            lay = cps.layout
            loc = [cp_local(x.detach(), lay, m).requires_grad_() for x in xs]
            w_loc = cp_local(w, lay, m)
            w_loc[:, :m] /= cp.size  # the meta rows are replicated: each rank carries 1/cp of their loss
            with COUNTER.counting() as sent:
                o = _apply(case, extra, loc, params, cp_local(doc, lay, m), cps)
                grads = torch.autograd.grad((o * w_loc).sum(), loc + params)
            sent = dict(sent)
            o_full = cp_gather(o.detach(), lay, m, group)
            o_full[:, :m] /= cp.size  # every rank computed the meta rows: the sum is cp copies
            errs = {"out": rel_rms(o_full, ref.detach())}
            for i, (gl, gr) in enumerate(zip(grads[:len(xs)], ref_grads)):
                errs[f"grad_in{i}"] = rel_rms(cp_gather(gl, lay, m, group), gr)
            for i, (gl, gr) in enumerate(zip(grads[len(xs):], ref_grads[len(xs):])):
                gl = gl.clone()
                dist.all_reduce(gl, group=group)  # replicated parameters: the data-parallel sum
                errs[f"grad_param{i}"] = rel_rms(gl, gr)
            out[name] = {"errs": errs, "sent": sent, "chunk": lay.chunk}
        except Exception as exc:  # recorded so one broken case does not hide the others
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


_CACHE: dict = {}


def _results(kind: str, cp: int, layout: str) -> dict:
    key = (kind, cp, layout)
    if key not in _CACHE:
        _CACHE[key] = run_group(cp, "test_cp_recurrent.run_cases", kind, layout)
    return _CACHE[key]


def _check(res: dict) -> None:
    assert "error" not in res, res.get("error")
    assert len(res["errs"]) > 1
    for what, err in res["errs"].items():
        assert err <= TOL, f"{what}: rel RMS {err:.2e} > {TOL}"


# Halo bytes rank 0 sends (zigzag, halo ≤ chunk): its first chunk's last n rows, to rank 1 only
# (its other chunk is the last of the sequence); the backward returns as many gradient bytes.
HALO_CHANNELS = {"conv-docs-meta": (3, C), "shift": (1, H * K + H)}


@pytest.mark.parametrize("case", list(HALO_CHANNELS))
def test_cp2_zigzag_halo_bytes(case):
    res = _results("ring", 2, "zigzag")[case]
    n, channels = HALO_CHANNELS[case]
    assert n <= res["chunk"]
    assert res["sent"]["halo"] == n * B * channels * 4
    assert res["sent"]["halo.grad"] == n * B * channels * 4


@pytest.mark.parametrize("case", list(CASES))
def test_cp2_zigzag(case):
    _check(_results("ring", 2, "zigzag")[case])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("case", list(CASES))
def test_cp4(case, layout):
    _check(_results("ring", 4, layout)[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_cp2_contiguous(case):
    _check(_results("ring", 2, "contiguous")[case])


# State passing: every rank all-gathers its per-segment maps (KDA [H, K, V+K], SSM [2, C, N] per
# row and segment, fp32); the backward reduce-scatters the gathered gradient, sending each other rank
# its slice (one rank's maps).
STATE_MAPS = {"kda": ("kda.state", H * K * (V + K)), "scan-docs": ("ssm.state", 2 * C * N)}


@pytest.mark.parametrize("case", list(STATE_MAPS))
def test_cp2_zigzag_state_bytes(case):
    res = _results("ring", 2, "zigzag")[case]
    label, per_map = STATE_MAPS[case]
    cp, nseg = 2, 2
    local = B * nseg * per_map * 4
    assert res["sent"][label] == (cp - 1) * local
    assert res["sent"][label + ".grad"] == (cp - 1) * local
