"""Layout sizes and their errors, the DeepSpeed config we generate, and the DeviceMesh views
(the mesh itself on 4 gloo ranks, spawned)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from braid.config import ParallelConfig, load_config
from braid.errors import ConfigError
from braid.parallel.activation_checkpoint import checkpointed_layers
from braid.parallel.mesh import ParallelDims, build_mesh, resolve_dims
from braid.parallel.parallelize import _lazy, check_layout
from spawn_group import join_group, rendezvous


def dims(world: int, **kw) -> ParallelDims:
    return resolve_dims(ParallelConfig(**kw), world)


def test_sizes_default_to_all_ranks_sharded():
    d = dims(8)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp, d.dp) == (1, 8, 1, 1, 8)
    d = dims(8, dp_replicate=2, tp=2)
    assert (d.dp_shard, d.dp, d.dp_cp) == (2, 4, 4)


def test_dp_is_an_alias_that_must_agree():
    assert dims(4, dp=4).dp_shard == 4
    assert dims(4, dp=4, dp_replicate=2).dp_shard == 2
    with pytest.raises(ConfigError, match=r"'parallel.dp' = 2 contradicts"):
        dims(4, dp=2)
    with pytest.raises(ConfigError, match=r"'parallel.dp' = 4 contradicts"):
        dims(4, dp=4, tp=2)


@pytest.mark.parametrize("world,kw,key", [
    (4, dict(dp_shard=3), "parallel.dp_shard"),
    (4, dict(dp_replicate=3), "parallel.dp_replicate"),
    (6, dict(dp_replicate=2, dp_shard=2, tp=2), "parallel.tp"),
    (4, dict(ep=3), "parallel.ep"),
])
def test_bad_products_are_one_line_errors_naming_the_keys(world, kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        dims(world, **kw)
    assert "\n" not in str(err.value)


def test_layouts_this_build_cannot_run():
    check_layout(ParallelConfig(cp=2), dims(2, cp=2))  # context parallelism runs under FSDP2
    with pytest.raises(ConfigError, match=r"'parallel.engine' = 'deepspeed' runs data parallelism only"):
        check_layout(ParallelConfig(engine="deepspeed", cp=2), dims(2, cp=2))
    with pytest.raises(ConfigError, match=r"'parallel.engine' = 'deepspeed' runs data parallelism only"):
        check_layout(ParallelConfig(engine="deepspeed", tp=2), dims(2, tp=2))
    with pytest.raises(ConfigError, match=r"'parallel.cpu_offload' needs"):
        check_layout(ParallelConfig(cpu_offload=True), dims(1))
    with pytest.raises(ConfigError, match=r"'parallel.tp' > 1 is not available yet"):
        _lazy("braid.parallel.no_such_module", "apply_tp", "parallel.tp")


def test_activation_checkpoint_selection():
    assert checkpointed_layers("none", 6) == []
    assert checkpointed_layers("full", 3) == [0, 1, 2]
    assert checkpointed_layers("every_2", 6) == [1, 3, 5]
    assert checkpointed_layers("every_4", 3) == []
    with pytest.raises(ConfigError, match="parallel.activation_checkpoint"):
        checkpointed_layers("some", 3)


def test_deepspeed_config_follows_ours(tmp_path):
    from braid.parallel.deepspeed_engine import ds_config

    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=16", "train.grad_clip=0.5",
                             "parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.cpu_offload=true"])
    c = ds_config(cfg, dp=2, grad_accum=4, bf16=False)
    assert c["train_batch_size"] == 16 and c["train_micro_batch_size_per_gpu"] == 2
    assert c["gradient_accumulation_steps"] == 4 and c["gradient_clipping"] == 0.5
    assert c["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                      "offload_param": {"device": "cpu"}}
    assert c["bf16"] == {"enabled": False}


def _mesh_worker(rank: int, world: int, port: int, queue) -> None:
    join_group(rank, world, port)
    try:
        mesh = build_mesh(dims(world, dp_replicate=2, tp=2), "cpu")
        out = {name: mesh.local_rank(name) for name in ("dp_replicate", "dp_shard", "tp", "dp", "dp_cp")}
        out["sizes"] = {n: mesh.sub(n).size() for n in ("dp", "dp_shard_cp", "dp_cp", "tp")}
        out["fsdp_ndim"] = mesh.fsdp_mesh().ndim
        t = torch.tensor([float(rank)])  # the loss group sums over data ranks, never tensor ranks
        dist.all_reduce(t, group=mesh.group("dp_cp"))
        out["dp_cp_sum"] = t.item()
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kw,dp_cp_groups", [
    (dict(dp_replicate=2, tp=2), [[0, 2], [1, 3], [0, 2], [1, 3]]),
    (dict(dp_replicate=2), [[0, 1, 2, 3]] * 4),
    (dict(dp_shard=4, ep=2), [[0, 1, 2, 3]] * 4),
])
def test_mesh_views_of_each_rank(kw, dp_cp_groups):
    """Rank r = (((replicate · dp_shard + shard) · cp + c) · tp + t); built for each of 4 ranks in
    this process with torch's fake backend (groups without communication)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    d = dims(4, **kw)
    for rank in range(4):
        dist.init_process_group("fake", rank=rank, world_size=4, store=FakeStore())
        try:
            mesh = build_mesh(d, "cpu")
            assert mesh.local_rank("tp") == rank % d.tp
            assert mesh.dp_rank == rank // d.tp  # cp = 1: data ranks are the outer coordinates
            assert mesh.local_rank("dp_replicate") == rank // (d.dp_shard * d.tp)
            assert dist.get_process_group_ranks(mesh.group("dp_cp")) == dp_cp_groups[rank]
            assert mesh.fsdp_mesh().ndim == (2 if d.dp_replicate > 1 else 1)
            if d.ep > 1:
                assert mesh.sub("ep").size() == d.ep and mesh.local_rank("ep") == rank % d.ep
                # the replicas of rank r's experts: r ± ep (they hold the same expert shard)
                assert dist.get_process_group_ranks(mesh.group("dp_mod_ep")) == [rank % d.ep, rank % d.ep + 2]
        finally:
            dist.destroy_process_group()


@pytest.mark.slow
def test_mesh_collectives_on_four_ranks():
    """The real thing (gloo, 4 spawned ranks): the loss group sums data ranks, never tensor ranks."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with rendezvous() as port:
        mp.start_processes(_mesh_worker, args=(4, port, queue), nprocs=4, start_method="spawn", join=True)
    got = dict(queue.get() for _ in range(4))
    for rank, out in got.items():
        assert out["tp"] == rank % 2 and out["dp"] == rank // 2 and out["dp_replicate"] == rank // 2
        assert out["sizes"] == {"dp": 2, "dp_shard_cp": 1, "dp_cp": 2, "tp": 2}
        assert out["fsdp_ndim"] == 2  # HSDP: (dp_replicate, dp_shard_cp)
        assert out["dp_cp_sum"] == (0 + 2 if rank % 2 == 0 else 1 + 3)


def test_cli_bad_layout_exits_2_with_one_line_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    run_dir = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "braid.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                           f"run.dir={run_dir}", "parallel.dp_shard=2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'parallel.dp_shard'" in lines[0] and "world size 1" in lines[0], proc.stderr
    assert not run_dir.exists()


def test_deepspeed_refuses_scalar_parameters_in_one_line():
    from braid.models.hybrid import HybridLM
    from braid.models.stats import resolve_vocab
    from braid.parallel.deepspeed_engine import build_engine

    cfg = load_config(None, ["model.preset=llama-tiny", "model.connection=hc", "model.hc.dynamic=true",
                             "parallel.engine=deepspeed", "parallel.zero_stage=3"])
    model = HybridLM(resolve_vocab(cfg.model, 256))
    assert not any(p.ndim == 0 for p in model.parameters())  # hyper-connections keep [1] scales
    model.layers[0].register_parameter("scale", torch.nn.Parameter(torch.zeros(())))  # a future 0-d one
    with pytest.raises(ConfigError, match=r"'parallel.engine' = 'deepspeed' cannot flatten 0-d parameters"):
        build_engine(model, torch.optim.AdamW(model.parameters()), cfg, dp=1, grad_accum=1, bf16=False)
