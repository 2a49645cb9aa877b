"""Expert parallelism against one process: ep gloo ranks, each with its own tokens, give the same
outputs, input gradients, parameter gradients (experts: gathered shards; router/shared: summed over
ep ranks) and summed load counts as the unsharded MoE on all the ranks' tokens together (fp32, rel
RMS ≤ 1e-5); also with every expert's hidden units split over tp (ep × tp, sequence parallel on/off)."""

from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from braid.config import ModelConfig, MoEConfig
from braid.errors import ConfigError
from braid.models.moe import MoE
from helpers import rel_rms
from spawn_group import join_group, leave_group, rendezvous

TOL = 1e-5
B, T, D = 2, 12, 16

CASES = {
    "softmax": dict(n_experts=8, top_k=2, expert_hidden=8),
    "sigmoid-shared-groups-aux": dict(n_experts=8, top_k=3, expert_hidden=8, router="sigmoid", n_shared_experts=1,
                                      n_groups=4, topk_groups=2, routed_scaling=2.0, aux_loss_coef=0.1,
                                      z_loss_coef=0.01),
    # one expert gets almost every token: some ranks receive nothing for some experts
    "skewed": dict(n_experts=4, top_k=1, expert_hidden=8),
}


def _build(case: str) -> MoE:
    cfg = ModelConfig(pattern="A", d_model=D, n_heads=2, ffn_multiple=16, moe=MoEConfig(**CASES[case]))
    torch.manual_seed(0)
    m = MoE(cfg, layer_idx=0)
    with torch.no_grad():
        m.router.weight.normal_(0.0, 1.0)
        m.gate_up.normal_(0.0, 0.5)
        m.down.normal_(0.0, 0.5)
        m.expert_bias.normal_(0.0, 0.1)
        if case == "skewed":
            m.expert_bias[1] = 5.0
    return m.train()


def _run_case(case: str, ep_mesh, tp_mesh=None, sp: bool = False) -> dict:
    """ep ranks with their own tokens; with ``tp_mesh`` every expert's hidden units are also split over
    tp (``tp_plans/moe.py``, applied first as in ``parallelize``), the tp ranks of an ep rank sharing
    its tokens (with ``sp``: each holding one time chunk of them)."""
    from torch.distributed.tensor import DTensor

    from braid.parallel.expert_parallel import apply_ep
    from braid.parallel.tp_plans.moe import shard_moe

    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    tp, tp_rank = (1, 0) if tp_mesh is None else (tp_mesh.size(), tp_mesh.get_local_rank())
    ref = _build(case)
    model = copy.deepcopy(ref)
    if tp > 1:
        shard_moe(model, tp_mesh, sp)
    apply_ep(model, ep_mesh)
    g = torch.Generator().manual_seed(11)
    x_all = torch.randn(ep * B, T, D, generator=g, requires_grad=True)
    w_all = torch.randn(ep * B, T, D, generator=g)
    out_ref = ref(x_all)
    aux_ref = ref.aux_loss if ref.aux_loss is not None else 0.0
    # Each rank's aux loss is a mean over its own B sequences: their sum is ep × the reference's.
    ((out_ref * w_all).sum() + ep * aux_ref).backward()

    mine = (slice(rank * B, (rank + 1) * B), slice(None))
    if sp:  # this tp rank's time chunk
        mine = (mine[0], slice(tp_rank * T // tp, (tp_rank + 1) * T // tp))
    x = x_all.detach()[mine].clone().requires_grad_()
    out = model(x)
    aux = model.aux_loss if model.aux_loss is not None else 0.0  # the same on every tp rank
    ((out * w_all[mine]).sum() + aux).backward()

    errors = {"out": rel_rms(out, out_ref[mine]), "input grad": rel_rms(x.grad, x_all.grad[mine])}
    ep_group = ep_mesh.get_group()
    counts = model.load_counts.clone()
    dist.all_reduce(counts, group=ep_group)
    errors["load_counts"] = float((counts != ref.load_counts).sum())
    # Gradients below 1e-6 of the layer's largest are rounding noise (see below): compared in absolute terms.
    scale = max(float(q.grad.norm()) for q in ref.parameters())
    for name, p in model.named_parameters():
        p_ref = dict(ref.named_parameters())[name]
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
        if name not in ("gate_up", "down"):  # replicated over ep but fed different tokens: summed
            dist.all_reduce(grad, group=ep_group)
        g_ref = p_ref.grad
        # A skewed router leaves some experts without tokens: their gradient must be zero. With top-1
        # and renormalised weights (all 1) the router's true gradient is 0 and fp32 leaves ~1e-5 noise.
        errors[name] = (rel_rms(grad, g_ref) if float(g_ref.norm()) > 1e-6 * scale
                        else float(grad.norm()) / scale)
    return errors


def _worker(rank: int, world: int, port: int, tp: int, sp: bool, out_path: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world, port)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("ep", "tp"))
    results = {}
    for case in CASES:
        try:
            errors = _run_case(case, mesh["ep"], mesh["tp"] if tp > 1 else None, sp)
            worst = max(errors, key=errors.get)
            mx = torch.tensor([errors[worst]], dtype=torch.float64)
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
            results[case] = {"max": float(mx), "worst": worst, "n": len(errors)}
        except Exception as exc:
            results[case] = {"error": f"{type(exc).__name__}: {exc}"}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    leave_group()


_CACHE: dict = {}


def run_layout(ep: int, tp: int = 1, sp: bool = False) -> dict:
    key = (ep, tp, sp)
    if key not in _CACHE:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "out.json")
            with rendezvous() as port:
                mp.spawn(_worker, args=(ep * tp, port, tp, sp, path), nprocs=ep * tp, join=True)
            with open(path) as f:
                _CACHE[key] = json.load(f)
    return _CACHE[key]


def _check(result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["n"] >= 4
    assert result["max"] <= TOL, f"worst {result['worst']}: {result['max']:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_ep2_matches_unsharded_moe(case):
    _check(run_layout(2)[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ep4_matches_unsharded_moe(case):
    _check(run_layout(4)[case])


@pytest.mark.parametrize("case", list(CASES))
def test_ep2_tp2_sequence_parallel_matches_unsharded_moe(case):
    """4 ranks: experts over ep, each expert's hidden units over tp (2-D DTensors), SP on."""
    _check(run_layout(2, 2, True)[case])


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_alone_matches_unsharded_moe(case, sp):
    _check(run_layout(1, 2, sp)[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ep2_tp2_without_sequence_parallel_matches_unsharded_moe(case):
    _check(run_layout(2, 2, False)[case])


def test_experts_not_divisible_by_ep_is_a_config_error():
    from braid.parallel.expert_parallel import apply_ep

    class FakeMesh:  # apply_ep checks sizes before any communication
        def size(self):
            return 3

        def get_group(self):
            return None

    moe = _build("softmax")
    with pytest.raises(ConfigError, match="model.moe.n_experts"):
        apply_ep(moe, FakeMesh())
