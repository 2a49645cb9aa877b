"""The meta-device build (braid.trainer.training_model.build_parallel_model): step-0 weights are the
same bits under every layout, every init rule keeps its distribution, and a sharded build never holds
the whole model, nor does loading a HF directory into it (gloo ranks on CPU; larger layouts under the fake
process group)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from braid.config import load_config
from braid.models.hybrid import HybridLM
from braid.models.stats import resolve_vocab
from helpers import peak_rss_bytes, reset_peak_rss, rss_bytes

PRESETS = ["moe-tiny", "kimi-linear-tiny", "hymba-tiny", "fox-pro-tiny", "hybrid-tiny"]


def _cfg(preset: str, layout: dict):
    over = {"model.preset": preset, "data.seq_len": 32, "train.global_batch_size": 8, "train.micro_batch_size": 1}
    over.update(layout)
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def _build(preset: str, layout: dict, world: int):
    from braid.parallel.mesh import build_mesh, check_world
    from braid.trainer.training_model import build_parallel_model

    cfg = _cfg(preset, layout)
    dims = check_world(cfg, world)
    mesh = build_mesh(dims, "cpu")
    return build_parallel_model(resolve_vocab(cfg.model, 256), mesh, cfg.parallel, torch.device("cpu"), None,
                                cfg.train.seed)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def _full_digests(model) -> dict[str, str]:
    from torch.distributed.tensor import DTensor

    from braid.parallel.materialize import plain_name

    out = {}
    for name, p in model.named_parameters():
        out[plain_name(name)] = _digest(p.full_tensor() if isinstance(p, DTensor) else p)
    for name, b in model.named_buffers():
        out["buffer:" + plain_name(name)] = _digest(b)
    return out


def digests_on_ranks(preset: str, layouts: dict) -> dict:
    """Spawned rank: build under each layout and return the full weights' digests (rank 0 reports)."""
    import torch.distributed as dist

    return {name: _full_digests(_build(preset, layout, dist.get_world_size())) for name, layout in layouts.items()}


LAYOUTS = {"dp_shard2_tp2": {"parallel.dp_shard": 2, "parallel.tp": 2},
           "dp_shard4_ep2": {"parallel.dp_shard": 4, "parallel.ep": 2},
           "dp_shard2_tp2_ep2": {"parallel.dp_shard": 2, "parallel.tp": 2, "parallel.ep": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["moe-tiny", "kimi-linear-tiny"])
def test_step0_weights_are_the_same_bits_under_every_layout(preset):
    from tests.spawn_group import run_group

    ref = _full_digests(_build(preset, {}, 1))
    for name, got in run_group(4, "tests.test_meta_build.digests_on_ranks", preset, LAYOUTS).items():
        assert got.keys() == ref.keys(), name
        assert [k for k in ref if got[k] != ref[k]] == [], f"{preset} {name}: weights differ from one process"


def test_draws_do_not_depend_on_order_or_other_parameters():
    cfg = resolve_vocab(_cfg("hybrid-tiny", {}).model, 256)
    from braid.models.init import draw_parameter

    with torch.device("meta"):
        template = HybridLM(cfg)
    names = [n for n, _ in template.named_parameters()]
    forward = {n: draw_parameter(template, n, torch.device("cpu"), 7) for n in names}
    backward = {n: draw_parameter(template, n, torch.device("cpu"), 7) for n in reversed(names)}
    assert all(torch.equal(forward[n], backward[n]) for n in names)
    assert all(p.is_meta for p in template.parameters())  # the template is never allocated
    other_seed = draw_parameter(template, "embed.weight", torch.device("cpu"), 8)
    assert not torch.equal(other_seed, forward["embed.weight"])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_init_rule_keeps_its_distribution(preset):
    """Each parameter drawn by name has the distribution the in-place rules give it: constants equal,
    random ones the same mean and spread (relative to their scale) and the same range."""
    from braid.models.init import draw_parameter

    cfg = resolve_vocab(_cfg(preset, {}).model, 256)
    torch.manual_seed(0)
    plain = HybridLM(cfg)
    with torch.device("meta"):
        template = HybridLM(cfg)
    for name, ref in plain.named_parameters():
        got = draw_parameter(template, name, torch.device("cpu"), 1234)
        assert got.shape == ref.shape, name
        if ref.numel() < 64 or ref.std() == 0 or got.std() == 0:
            # constants, position-dependent (hyper-connection) or too small to compare statistically
            same_kind = torch.equal(got, ref) or (ref.numel() < 64 and ref.std() > 0 and got.std() > 0)
            assert same_kind, name
            continue
        ref, n = ref.detach(), ref.numel()
        sd = float(ref.std())
        assert abs(float(got.mean() - ref.mean())) < 6 * sd / n**0.5 + 1e-6, name  # six standard errors
        assert float(got.std()) == pytest.approx(sd, rel=max(0.05, 6 / n**0.5)), name
        spread = float(ref.max() - ref.min())
        assert float(got.min()) >= float(ref.min()) - 0.5 * spread, name
        assert float(got.max()) <= float(ref.max()) + 0.5 * spread, name
    for (name, a), (_, b) in zip(plain.named_buffers(), HybridLM(cfg).named_buffers()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ larger layouts: fake process group

def fake_rank_shards(preset: str, layout: dict, world: int, rank: int) -> dict:
    """In a fresh process (DeviceMesh state is per process): rank ``rank`` of ``world`` under the fake
    process group; its local shards and which elements of the full tensors they are."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from braid.parallel.materialize import local_part, plain_name

    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        out = {}
        for name, p in _build(preset, layout, world).named_parameters():
            if isinstance(p, DTensor):  # which elements: the same slicing applied to an index tensor
                where = local_part(torch.arange(p.numel()).reshape(p.shape), p).reshape(-1)
                out[plain_name(name)] = (p.to_local().detach().reshape(-1), where)
            else:
                out[plain_name(name)] = (p.detach().reshape(-1), torch.arange(p.numel()))
        # numpy arrays: torch tensors would travel as shared memory that this process takes with it
        return {n: (a.numpy().copy(), w.numpy().copy()) for n, (a, w) in out.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("preset,layout,world", [
    ("moe-tiny", {"parallel.dp_shard": 4, "parallel.tp": 2, "parallel.ep": 2}, 8),
    ("kimi-linear-tiny", {"parallel.dp_shard": 4, "parallel.ep": 4}, 4),
])
def test_each_rank_of_a_large_layout_draws_its_own_shard(preset, layout, world):
    """Every rank of the layout (each in its own process, under the fake process group) holds exactly its
    slice of the one-process weights, and the slices of all ranks cover every element."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ref = {n: p.detach().reshape(-1) for n, p in _build(preset, {}, 1).named_parameters()}
    covered = {n: torch.zeros(p.numel(), dtype=torch.int32) for n, p in ref.items()}
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        ranks = list(pool.map(fake_rank_shards, *zip(*[(preset, layout, world, r) for r in range(world)])))
    for rank, shards in enumerate(ranks):
        assert shards.keys() == ref.keys()
        for name, (local, where) in shards.items():
            local, where = torch.from_numpy(local), torch.from_numpy(where)
            assert torch.equal(local, ref[name][where]), f"rank {rank} {name}"
            covered[name][where] += 1
    assert [n for n, c in covered.items() if not bool((c > 0).all())] == []


# ------------------------------------------------------------------ memory

ZERO3 = {"parallel.engine": "deepspeed", "parallel.zero_stage": 3}
MEMORY_MODEL = {"model.preset": "tiny", "model.d_model": 768, "model.n_heads": 8, "model.n_kv_heads": 8,
                "model.pattern": "AAAAAAAAAAAA"}


def build_memory(layout: dict) -> dict:
    """Spawned rank: the growth of this process's peak RSS while building, and the sizes to compare."""
    import torch.distributed as dist

    from braid.parallel.mesh import build_mesh, check_world
    from braid.trainer.training_model import build_parallel_model

    _local_rank()
    cfg = _cfg("tiny", {**MEMORY_MODEL, **layout})
    model_cfg = resolve_vocab(cfg.model, 256)
    with torch.device("meta"):
        sizes = [p.numel() * 4 for p in HybridLM(model_cfg).parameters()]
    mesh = build_mesh(check_world(cfg, dist.get_world_size()), "cpu")
    if cfg.parallel.engine == "deepspeed":  # its import and communication set-up are not the model's
        from braid.parallel.deepspeed_engine import import_deepspeed

        import_deepspeed().init_distributed(dist_backend="gloo")
    before = rss_bytes()
    reset_peak_rss()
    model = build_parallel_model(model_cfg, mesh, cfg.parallel, torch.device("cpu"), None, cfg.train.seed)
    peak = peak_rss_bytes()
    from torch.distributed.tensor import DTensor

    from braid.parallel.zero3 import is_partitioned

    def local_numel(p):
        return p.ds_tensor.numel() if is_partitioned(p) else (p.to_local() if isinstance(p, DTensor) else p).numel()

    local = sum(local_numel(p) * 4 for p in model.parameters())
    return {"growth": peak - before, "full": sum(sizes), "largest": max(sizes), "local": local}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_a_dp_shard2_build_never_holds_the_whole_model(engine):
    from tests.spawn_group import run_group

    layout = {"parallel.dp_shard": 2, **(ZERO3 if engine == "zero3" else {})}
    got = run_group(2, "tests.test_meta_build.build_memory", layout)
    assert got["local"] <= got["full"] // 2 + got["largest"]
    # Its shard, one full parameter being drawn, and allocator slack: well under the whole model.
    assert got["growth"] <= got["local"] + 2 * got["largest"] + 32 * 2**20, got
    assert got["growth"] < 0.8 * got["full"], got


def _local_rank() -> None:
    """In a spawned rank: set what torchrun sets and deepspeed.zero.Init reads."""
    import os

    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(dist.get_rank())




def _gathered_digests(model) -> dict[str, str]:
    """A ZeRO-3 model's full weights (gathered on every rank for the digest) and buffers."""
    from braid.parallel.deepspeed_engine import import_deepspeed

    with import_deepspeed().zero.GatheredParameters(list(model.parameters())):
        return _full_digests(model)


def zero3_on_ranks(presets: list[str]) -> dict:
    """Spawned rank: per preset, the full weights' digests of a ZeRO-3 build and of a dp_shard build, and
    the ZeRO-3 partitions' sizes against the model's."""
    import torch.distributed as dist

    _local_rank()
    out = {}
    for preset in presets:
        world = dist.get_world_size()
        model = _build(preset, {**ZERO3, "parallel.dp_shard": world}, world)
        from braid.parallel.zero3 import is_partitioned

        assert all(is_partitioned(p) and p.numel() == 0 for p in model.parameters())
        local = sum(p.ds_tensor.numel() for p in model.parameters())
        full = sum(p.ds_numel for p in model.parameters())
        fsdp = _build(preset, {"parallel.dp_shard": world}, world)
        out[preset] = {"zero3": _gathered_digests(model), "fsdp": _full_digests(fsdp), "local": local, "full": full,
                       "n": len(list(model.parameters()))}
    return out


@pytest.mark.slow
def test_zero3_builds_each_rank_s_partitions_with_the_weights_of_every_other_layout():
    """ZeRO-3 starts from the meta device too: every parameter is a DeepSpeed partition from the start
    (never whole on a rank), holding the same step-0 weights as FSDP2's shards (Hymba included, whose
    modules initialise themselves in ``__init__``, which deepspeed.zero.Init construction cannot take)."""
    from tests.spawn_group import run_group

    got = run_group(2, "tests.test_meta_build.zero3_on_ranks", PRESETS)
    for preset, r in got.items():
        assert r["zero3"].keys() == r["fsdp"].keys(), preset
        assert [k for k in r["fsdp"] if r["zero3"][k] != r["fsdp"][k]] == [], preset
        assert r["local"] <= r["full"] // 2 + r["n"], preset  # half of each flat parameter, padded


def _export(preset: str, overrides: dict, out) -> dict[str, str]:
    """A HF export of a seeded plain model of ``preset``; returns its weights' digests."""
    from braid.convert.hf_export import export_hf

    cfg = _cfg(preset, overrides)
    cfg.model = resolve_vocab(cfg.model, 256)
    torch.manual_seed(1)
    model = HybridLM(cfg.model)
    export_hf(model, cfg, out)
    return _full_digests(model)


def init_from_hf_on_ranks(preset: str, overrides: dict, hf_dir: str) -> dict:
    """Spawned rank: a parallel build, then checkpoint.init_from's HF load; its peak-RSS growth and digests."""
    import torch.distributed as dist

    from braid.convert.init_weights import load_init_weights
    from braid.parallel.mesh import build_mesh, check_world
    from braid.trainer.training_model import build_parallel_model

    _local_rank()
    cfg = _cfg(preset, overrides)
    model_cfg = resolve_vocab(cfg.model, 256)
    with torch.device("meta"):
        sizes = [p.numel() * 4 for p in HybridLM(model_cfg).parameters()]
    mesh = build_mesh(check_world(cfg, dist.get_world_size()), "cpu")
    model = build_parallel_model(model_cfg, mesh, cfg.parallel, torch.device("cpu"), None, cfg.train.seed)
    before = rss_bytes()
    reset_peak_rss()
    load_init_weights(model, hf_dir)
    growth = peak_rss_bytes() - before
    digests = _gathered_digests(model) if cfg.parallel.engine == "deepspeed" else _full_digests(model)
    return {"growth": growth, "full": sum(sizes), "largest": max(sizes), "digests": digests}


@pytest.mark.slow
@pytest.mark.parametrize("preset, layout", [
    ("kimi-linear-tiny", {"parallel.dp_shard": 2, "parallel.tp": 2}),
    ("moe-tiny", {"parallel.dp_shard": 4, "parallel.ep": 2}),
])
def test_init_from_a_hf_dir_fills_every_shard_with_the_exported_weights(tmp_path, preset, layout):
    from tests.spawn_group import run_group

    want = _export(preset, {}, tmp_path / "hf")
    got = run_group(4, "tests.test_meta_build.init_from_hf_on_ranks", preset, layout, str(tmp_path / "hf"))
    assert got["digests"] == want


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "braid"])
def test_init_from_fills_zero3_partitions_with_the_saved_weights(tmp_path, source):
    """checkpoint.init_from under DeepSpeed ZeRO-3: a HF directory or a braid DCP checkpoint is read one
    full tensor at a time into each rank's partitions (hymba-tiny: buffers, tags and self-initialising
    modules)."""
    from braid.convert.braid_checkpoint import save_braid_checkpoint
    from tests.spawn_group import run_group

    preset = "hymba-tiny"
    want = _export(preset, {}, tmp_path / "hf")
    if source == "braid":
        cfg = _cfg(preset, {})
        cfg.model = resolve_vocab(cfg.model, 256)
        torch.manual_seed(1)
        save_braid_checkpoint(HybridLM(cfg.model), cfg, tmp_path / "run")
    path = tmp_path / ("hf" if source == "hf" else "run")
    got = run_group(2, "tests.test_meta_build.init_from_hf_on_ranks", preset, {**ZERO3, "parallel.dp_shard": 2},
                    str(path))
    assert got["digests"] == want


@pytest.mark.slow
def test_init_from_a_hf_dir_reads_one_parameter_at_a_time(tmp_path):
    from tests.spawn_group import run_group

    _export("tiny", MEMORY_MODEL, tmp_path / "hf")
    got = run_group(2, "tests.test_meta_build.init_from_hf_on_ranks", "tiny", {**MEMORY_MODEL, "parallel.dp_shard": 2},
                    str(tmp_path / "hf"))
    # The shards exist already: a read adds one full tensor, its conversion and allocator slack, not the model.
    assert got["growth"] <= 3 * got["largest"] + 48 * 2**20, {k: v for k, v in got.items() if k != "digests"}
    assert got["growth"] < 0.3 * got["full"], {k: v for k, v in got.items() if k != "digests"}
