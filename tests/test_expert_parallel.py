"""Expert parallelism against one process: ep gloo ranks, each with its own tokens, give the same
outputs, gradients (experts: the rank's shard; router/shared: summed over ranks) and summed load
counts as the unsharded MoE on all the ranks' tokens together (fp32, rel RMS ≤ 1e-5)."""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from braid.config import ModelConfig, MoEConfig
from braid.errors import ConfigError
from braid.models.moe import MoE
from helpers import rel_rms

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _run_case(case: str, ep_mesh) -> dict:
    from braid.parallel.expert_parallel import apply_ep

    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    ref = _build(case)
    model = copy.deepcopy(ref)
    apply_ep(model, ep_mesh)
    g = torch.Generator().manual_seed(11)
    x_all = torch.randn(ep * B, T, D, generator=g)
    w_all = torch.randn(ep * B, T, D, generator=g)
    out_ref = ref(x_all)
    aux_ref = ref.aux_loss if ref.aux_loss is not None else 0.0
    # Each rank's aux loss is a mean over its own B sequences: their sum is ep × the reference's.
    ((out_ref * w_all).sum() + ep * aux_ref).backward()

    mine = slice(rank * B, (rank + 1) * B)
    x = x_all[mine].clone().requires_grad_()
    out = model(x)
    aux = model.aux_loss if model.aux_loss is not None else 0.0
    ((out * w_all[mine]).sum() + aux).backward()

    errors = {"out": rel_rms(out, out_ref[mine])}
    counts = model.load_counts.clone()
    dist.all_reduce(counts)
    errors["load_counts"] = float((counts != ref.load_counts).sum())
    e_local = ref.n_experts // ep
    for name, p in model.named_parameters():
        p_ref = dict(ref.named_parameters())[name]
        if name in ("gate_up", "down"):
            grad = p.grad.to_local()
            g_ref = p_ref.grad[rank * e_local:(rank + 1) * e_local]
        else:  # replicated over ep but fed different tokens: the data-parallel sum is the reference
            grad = p.grad.clone()
            dist.all_reduce(grad)
            g_ref = p_ref.grad
        # A skewed router leaves some experts without tokens: their gradient must be exactly zero.
        errors[name] = rel_rms(grad, g_ref) if float(g_ref.norm()) > 0 else float(grad.abs().max())
    return errors


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    results = {}
    for case in CASES:
        try:
            errors = _run_case(case, mesh)
            worst = max(errors, key=errors.get)
            mx = torch.tensor([errors[worst]], dtype=torch.float64)
            dist.all_reduce(mx, op=dist.ReduceOp.MAX)
            results[case] = {"max": float(mx), "worst": worst, "n": len(errors)}
        except Exception as exc:
            results[case] = {"error": f"{type(exc).__name__}: {exc}"}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


_CACHE: dict = {}


def run_layout(ep: int) -> dict:
    if ep not in _CACHE:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "out.json")
            mp.spawn(_worker, args=(ep, _free_port(), path), nprocs=ep, join=True)
            with open(path) as f:
                _CACHE[ep] = json.load(f)
    return _CACHE[ep]


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
