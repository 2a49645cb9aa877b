"""Pipeline parallelism (``parallel.pp``): the stage split, its one-line errors, and pipelined runs (gloo,
torchrun on CPU) against one process: the loss and grad norm of every step (test_parallel_train's bounds),
the evaluation loss and every parameter after 3 steps (the step-3 DCP checkpoints, 1e-5), and resumes of
pipelined checkpoints under other pp and dp_shard × tp layouts."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch

from braid.config import load_config
from braid.errors import ConfigError
from braid.parallel.pipeline import balanced_cuts, rank_stages, shared_state_cuts, stage_bounds
from test_parallel_train import (
    LOSS_RTOL,
    assert_same_trajectory,
    eval_losses,
    launch,
    overrides,
    run_one_process,
    train_records,
)

# The bound. A pipeline changes no reduction order within a stage (tp's and CP's own orders move
# weights by up to 3e-4, so those compositions are held to the same layout at pp 1); a dropped or doubled
# micro-batch moves them by >1e-2.
PARAM_RTOL = 1e-5


# ------------------------------------------------------------------------------------------- the split

def _brute_force(weights, n_stages, tail, forbidden=frozenset()):
    best = None
    for cuts in itertools.combinations(range(1, len(weights)), n_stages - 1):
        if set(cuts) & forbidden:
            continue
        edges = [0, *cuts, len(weights)]
        sums = [sum(weights[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        sums[-1] += tail
        if best is None or max(sums) < best[0]:
            best = (max(sums), list(cuts))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_balanced_cuts_minimise_the_largest_stage(seed):
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(9, generator=g) * 10 + 0.5).tolist()
    tail = float(torch.rand((), generator=g) * 8)
    forbidden = frozenset({3, 7}) if seed % 2 else frozenset()
    for n_stages in (2, 3, 4):
        cuts = balanced_cuts(weights, n_stages, tail, forbidden)
        edges = [0, *cuts, len(weights)]
        sums = [sum(weights[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        sums[-1] += tail
        assert not set(cuts) & forbidden and len(cuts) == n_stages - 1
        assert max(sums) == pytest.approx(_brute_force(weights, n_stages, tail, forbidden)[0])


class _Bytes:
    """A stand-in for SplitMemory: per-layer bytes, a per-stage multiplier (the schedule's stash), a limit."""

    def __init__(self, per_layer, stash, limit):
        self.per_layer, self.stash, self.limit = per_layer, stash, limit

    def stage_bytes(self, stage, lo, hi, n_stages):
        return self.stash[stage] * sum(self.per_layer[lo:hi])

    def stage_matrix(self, stage, n_stages):
        import numpy as np

        n = len(self.per_layer)
        return np.array([[self.stage_bytes(stage, j, i, n_stages) for i in range(n + 1)] for j in range(n + 1)])

    def fits(self, nbytes):
        return nbytes <= self.limit if self.limit is not None else nbytes == nbytes


def _splits(n, n_stages, forbidden=frozenset()):
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        if not set(cuts) & forbidden:
            edges = [0, *cuts, n]
            yield list(cuts), list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("seed", range(8))
def test_memory_split_is_the_fastest_that_fits_then_the_leanest(seed):
    """Against every split: the fastest whose every stage fits; among the equally fast, the least full; when
    none fits, the least full."""
    g = torch.Generator().manual_seed(seed)
    n, n_stages = 8, 3
    weights = torch.randint(1, 4, (n,), generator=g).double().tolist()  # small integers: many ties in time
    per_layer = (torch.rand(n, generator=g) + 0.5).tolist()
    stash = [3, 2, 1]  # 1F1B's: the first stage holds the most micro-batches
    fullest = [max(stash[k] * sum(per_layer[a:b]) for k, (a, b) in enumerate(st)) for _, st in _splits(n, n_stages)]
    limit = [None, sorted(fullest)[len(fullest) // 3], min(fullest) * 0.9][seed % 3]
    memory = _Bytes(per_layer, stash, limit)
    tail = 1.0

    def time_of(stages):
        return max(sum(weights[a:b]) + (tail if k == n_stages - 1 else 0) for k, (a, b) in enumerate(stages))

    def bytes_of(stages):
        return max(memory.stage_bytes(k, a, b, n_stages) for k, (a, b) in enumerate(stages))

    cuts = balanced_cuts(weights, n_stages, tail, memory=memory)
    got = [st for c, st in _splits(n, n_stages) if c == cuts][0]
    fitting = [st for _, st in _splits(n, n_stages) if memory.fits(bytes_of(st))]
    if fitting:
        fastest = min(time_of(st) for st in fitting)
        assert memory.fits(bytes_of(got)) and time_of(got) == fastest
        assert bytes_of(got) == pytest.approx(min(bytes_of(st) for st in fitting if time_of(st) == fastest))
    else:
        assert bytes_of(got) == pytest.approx(min(bytes_of(st) for _, st in _splits(n, n_stages)))


def test_the_split_keeps_a_stage_that_would_not_fit_off_the_gpu():
    """llama-tiny at 8 layers, pp 4 under 1F1B (the first stage holds 4 micro-batches, the last 1): with no
    GPU size the FLOPs split; on a GPU the fastest split overfills, fewer layers on the first stage, and the
    split's every stage fits."""
    from braid.models.stats import resolve_vocab
    from braid.plan.layout import Layout
    from braid.plan.memory import RESERVE_BYTES, RESERVE_FRACTION, SplitMemory
    from braid.plan.model_cost import layer_costs

    cfg = load_config(None, ["model.preset=llama-tiny", "model.pattern=********", "data.seq_len=256",
                             "model.vocab_size=512"])
    model_cfg = resolve_vocab(cfg.model, 512)
    cost = layer_costs(model_cfg, 256)
    lay = Layout(1, 1, 1, 1, 1, "-", "none", 8, 4, "1f1b")
    by_flops = stage_bounds(model_cfg, 4, 256, cost=cost)
    unsized = SplitMemory(cfg, cost, lay, 8)
    assert stage_bounds(model_cfg, 4, 256, cost=cost, memory=unsized) == by_flops  # equal layers: no time tie to break
    need = [unsized.stage_bytes(k, a, b, 4) for k, (a, b) in enumerate(by_flops)]
    assert need[0] == max(need)
    limit = 0.8 * need[0]
    sized = SplitMemory(cfg, cost, lay, 8, (limit + RESERVE_BYTES) / (1 - RESERVE_FRACTION))
    bounds = stage_bounds(model_cfg, 4, 256, cost=cost, memory=sized)
    assert bounds[0][1] - bounds[0][0] < by_flops[0][1] - by_flops[0][0]
    assert all(sized.stage_bytes(k, a, b, 4) <= limit * (1 + 1e-9) for k, (a, b) in enumerate(bounds))


def test_balanced_split_weighs_mixers_and_the_head():
    """hybrid-tiny's KDA and attention layers and the head: the cut the FLOPs call for, not layers / 2."""
    cfg = load_config(None, ["model.preset=kimi-linear-tiny", "model.vocab_size=50000"]).model
    bounds = stage_bounds(cfg, 2, 512)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(cfg.pattern)
    # A 50k-vocabulary head outweighs a layer of this tiny model: the last stage keeps the fewest layers.
    assert bounds[1][1] - bounds[1][0] < bounds[0][1] - bounds[0][0]


def test_pattern_marks_are_the_stages():
    cfg = load_config(None, ["model.preset=llama-tiny", "model.pattern=*-*-|*-*-", "parallel.pp=2"]).model
    assert stage_bounds(cfg, 2, 32) == [(0, 2), (2, 4)]


def test_hymba_shared_kv_layers_stay_on_one_stage():
    from braid.models.hybrid import HybridLM
    from braid.models.stats import resolve_vocab

    cfg = resolve_vocab(load_config(None, ["model.preset=hymba-tiny"]).model, 257)
    with torch.device("meta"):
        model = HybridLM(cfg)
    forbidden = shared_state_cuts(model)
    assert forbidden  # hymba-tiny shares K/V between layers
    for n in (2, 3):
        assert not set(balanced_cuts([1.0] * 4, n, 0.0, forbidden)) & forbidden


def test_stage_placement_is_looped_or_v():
    assert [rank_stages("1f1b", r, 4, 1) for r in range(4)] == [[0], [1], [2], [3]]
    assert rank_stages("interleaved_1f1b", 1, 2, 2) == [1, 3]
    assert [rank_stages("zbv", r, 2, 2) for r in range(2)] == [[0, 3], [1, 2]]


@pytest.mark.parametrize("args,key", [
    (["parallel.pp=2", "parallel.engine=deepspeed"], "parallel.pp"),
    (["parallel.pp=2", "model.tie_embeddings=true"], "model.tie_embeddings"),
    (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=3"], "parallel.pp_virtual_stages"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=1"],
     "parallel.pp_virtual_stages"),
    (["parallel.pp=2", "parallel.pp_virtual_stages=2"], "parallel.pp_virtual_stages"),
    (["parallel.pp=8"], "parallel.pp"),
    (["parallel.pp=2", "parallel.pp_schedule=1f1b", "model.pattern=*-|*-|*-"], "model.pattern"),
    (["parallel.pp=2", "parallel.pp_schedule=bogus"], "parallel.pp_schedule"),
])
def test_pipeline_mistakes_are_one_line_errors(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(None, ["model.preset=llama-tiny", *args])
    assert "\n" not in str(err.value)


def test_virtual_stages_default_to_the_schedules():
    from braid.config import virtual_stages

    for schedule, n in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2)):
        p = load_config(None, ["model.preset=llama-tiny", "parallel.pp=2", f"parallel.pp_schedule={schedule}"]).parallel
        assert virtual_stages(p) == n
    p = load_config(None, ["model.preset=llama-tiny", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                           "parallel.pp_virtual_stages=2"]).parallel
    assert virtual_stages(p) == 2


def test_too_few_micro_batches_for_the_schedule():
    from braid.parallel.mesh import check_world

    cfg = load_config(None, ["model.preset=llama-tiny", "parallel.pp=2", "train.micro_batch_size=2",
                             "train.global_batch_size=2"])
    with pytest.raises(ConfigError, match="train.global_batch_size.*1 micro-batches"):
        check_world(cfg, 2)


# ------------------------------------------------------------------------------------------- the runs

def _params(run_dir: Path, step: int = 3) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / f"params_{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step_{step}", out)
    return torch.load(out, weights_only=False)["model"]


def assert_same_run(run_dir: Path, ref_dir: Path, what: str) -> None:
    assert_same_trajectory(train_records(run_dir), train_records(ref_dir), what)
    assert eval_losses(run_dir) == pytest.approx(eval_losses(ref_dir), rel=LOSS_RTOL), what
    got, ref = _params(run_dir), _params(ref_dir)
    assert sorted(got) == sorted(ref), what
    for name, value in ref.items():
        err = (got[name].double() - value.double()).norm() / value.double().norm().clamp_min(1e-30)
        assert err <= PARAM_RTOL, f"{what}: {name} rel err {float(err):.2e}"


# Adam turns reduction-order noise in near-zero gradients into weight noise in proportion to the lr: at the
# matrix's 3e-3, hybrid-tiny's gpipe run ended 1.1e-5 from one process (a shared expert's down_proj).
LR = {"train.lr": 1e-3}


def _pp(**extra) -> dict:
    return {"checkpoint.interval": 3, **LR, **extra}


SCHEDULES = {"gpipe": {"parallel.pp_schedule": "gpipe"}, "1f1b": {"parallel.pp_schedule": "1f1b"},
             "interleaved": {"parallel.pp_schedule": "interleaved_1f1b", "parallel.pp_virtual_stages": 2},
             "zbv": {"parallel.pp_schedule": "zbv", "parallel.pp_virtual_stages": 2}}


def test_every_schedule_at_pp2_matches_one_process(tmp_path):
    """llama-tiny through each schedule on 2 stage ranks (one launch)."""
    ref = tmp_path / "ref"
    run_one_process(ref, "llama-tiny", **_pp())
    launch(tmp_path, 2, [overrides(tmp_path / name, "llama-tiny", **_pp(**{"parallel.pp": 2}, **s))
                         for name, s in SCHEDULES.items()])
    for name in SCHEDULES:
        assert_same_run(tmp_path / name, ref, f"pp2 {name}")


@pytest.mark.slow
def test_hybrid_every_schedule_and_pp4_match_one_process(tmp_path):
    """hybrid-tiny (KDA + gated attention + MoE) with each schedule at pp 2; pp 4 (1f1b, gpipe) for it and
    llama-tiny."""
    for preset in ("hybrid-tiny", "llama-tiny"):
        run_one_process(tmp_path / f"ref_{preset}", preset, **_pp())
    launch(tmp_path, 2, [overrides(tmp_path / f"h_{name}", "hybrid-tiny", **_pp(**{"parallel.pp": 2}, **s))
                         for name, s in SCHEDULES.items()])
    four = [(p, name) for p in ("hybrid-tiny", "llama-tiny") for name in ("1f1b", "gpipe")]
    launch(tmp_path, 4, [overrides(tmp_path / f"{p}_{n}_pp4", p, **_pp(**{"parallel.pp": 4}, **SCHEDULES[n]))
                         for p, n in four])
    for name in SCHEDULES:
        assert_same_run(tmp_path / f"h_{name}", tmp_path / "ref_hybrid-tiny", f"hybrid pp2 {name}")
    for p, n in four:
        assert_same_run(tmp_path / f"{p}_{n}_pp4", tmp_path / f"ref_{p}", f"{p} pp4 {n}")


# Two stages a rank at pp 4 are 8 stages: deeper versions of the two presets.
DEEP = {"llama-tiny": {"model.pattern": "AAAAAAAA"},
        "hybrid-tiny": {"model.pattern": "KKGKKGKKG", "model.ffn_pattern": "SEEEEEEEE"}}


@pytest.mark.slow
def test_interleaved_and_zbv_at_pp4_match_one_process(tmp_path):
    """Interleaved 1F1B and zero-bubble V on 4 stage ranks (8 stages): llama-tiny at 8 layers and hybrid-tiny
    at 9, one launch."""
    for preset, deep in DEEP.items():
        run_one_process(tmp_path / f"ref_{preset}", preset, **_pp(**deep))
    runs = [(p, n) for p in DEEP for n in ("interleaved", "zbv")]
    launch(tmp_path, 4, [overrides(tmp_path / f"{p}_{n}", p, **_pp(**{"parallel.pp": 4}, **SCHEDULES[n], **DEEP[p]))
                         for p, n in runs])
    for p, n in runs:
        assert_same_run(tmp_path / f"{p}_{n}", tmp_path / f"ref_{p}", f"{p} pp4 {n}")


@pytest.mark.slow
def test_pp2_composes_with_s2_context_parallel(tmp_path):
    """pp 2 × cp 2 with S2 head sharding (hybrid-tiny with S2 attention), held to cp 2 S2 without a pipeline."""
    from test_cp_train import S2_MODEL

    s2 = {**S2_MODEL, "parallel.cp": 2, "parallel.cp_kind": "s2"}
    launch(tmp_path, 2, [overrides(tmp_path / "pp1", "hybrid-tiny", **_pp(**s2))])
    launch(tmp_path, 4, [overrides(tmp_path / "pp2", "hybrid-tiny", **_pp(**{"parallel.pp": 2}, **s2))])
    assert_same_run(tmp_path / "pp2", tmp_path / "pp1", "pp2 × cp2 s2 against pp1 × cp2 s2")


@pytest.mark.slow
def test_pp2_composes_with_hsdp(tmp_path):
    """pp 2 × HSDP (dp_replicate 2 × dp_shard 2) on 8 ranks, held to HSDP without a pipeline on 4, and its
    trajectory to one process."""
    batch = {"train.global_batch_size": 8}  # 2 micro-batches for each of the 4 data-parallel ranks
    hsdp = {"parallel.dp_replicate": 2, "parallel.dp_shard": 2, **batch}
    run_one_process(tmp_path / "ref", "hybrid-tiny", **_pp(**batch))
    launch(tmp_path, 4, [overrides(tmp_path / "pp1", "hybrid-tiny", **_pp(**hsdp))])
    launch(tmp_path, 8, [overrides(tmp_path / "pp2", "hybrid-tiny", **_pp(**{"parallel.pp": 2}, **hsdp))])
    assert_same_run(tmp_path / "pp2", tmp_path / "pp1", "pp2 × hsdp against pp1 × hsdp")
    assert_same_trajectory(train_records(tmp_path / "pp2"), train_records(tmp_path / "ref"), "pp2 × hsdp")


COMPOSED = {
    "dp_shard2": {"parallel.dp_shard": 2},
    "tp2": {"parallel.tp": 2},
    "cp2_ring": {"parallel.cp": 2, "parallel.cp_kind": "ring"},
    "cp2_ulysses": {"parallel.cp": 2, "parallel.cp_kind": "ulysses"},
    "cp2_tree": {"parallel.cp": 2, "parallel.cp_kind": "tree"},
    "dp_shard2_ac": {"parallel.dp_shard": 2, "parallel.activation_checkpoint": "full"},
}


@pytest.mark.slow
@pytest.mark.timeout(600)  # twelve tiny runs: ~3.5 min on 2 cores
def test_pp2_composes_with_fsdp_tp_cp_and_ac(tmp_path):
    """pp 2 × (dp_shard 2 | tp 2 | cp 2 of each kind | dp_shard 2 with AC) on 4 ranks, hybrid-tiny, each held to
    the same layout without a pipeline on 2 ranks: tp's and ring/tree CP's own reduction orders move Adam's
    near-zero updates by up to ~3e-4 against one process (their own tests bound that); the pipeline must add
    nothing to them. pp 2 × dp_shard 2 is also held to one process."""
    ref = tmp_path / "ref"
    run_one_process(ref, "hybrid-tiny", **_pp())
    launch(tmp_path, 2, [overrides(tmp_path / f"{name}_pp1", "hybrid-tiny", **_pp(**extra))
                         for name, extra in COMPOSED.items()], timeout=290)
    launch(tmp_path, 4, [overrides(tmp_path / name, "hybrid-tiny", **_pp(**{"parallel.pp": 2}, **extra))
                         for name, extra in COMPOSED.items()], timeout=290)
    for name in COMPOSED:
        assert_same_run(tmp_path / name, tmp_path / f"{name}_pp1", f"pp2 × {name} against pp1 × {name}")
    assert_same_run(tmp_path / "dp_shard2", ref, "pp2 × dp_shard2 against one process")


@pytest.mark.slow
def test_kimi_with_hyper_connections_moe_aux_losses_and_experts_at_pp2(tmp_path):
    """kimi-linear-tiny with hyper-connection streams between stages, MoE balance and z-losses made on both
    stages (their gradients join the backward where they are made), and pp 2 × ep 2; hymba-tiny's meta
    tokens and shared K/V; FoX and Gated DeltaNet; a pattern whose '|' sets the stages."""
    kimi = {"model.connection": "hc", "model.moe.aux_loss_coef": 0.01, "model.moe.z_loss_coef": 0.001}
    hymba = {"model.tie_embeddings": "false"}
    marked = {"model.pattern": "*-*-*-|*-"}
    runs = {"kimi": ("kimi-linear-tiny", kimi), "hymba": ("hymba-tiny", hymba), "marked": ("llama-tiny", marked),
            "fox": ("fox-pro-tiny", {}), "gdn": ("gdn-tiny", {})}
    for name, (preset, extra) in runs.items():
        run_one_process(tmp_path / f"ref_{name}", preset, **_pp(**extra))
    launch(tmp_path, 2, [overrides(tmp_path / name, preset, **_pp(**{"parallel.pp": 2}, **extra))
                         for name, (preset, extra) in runs.items()])
    launch(tmp_path, 4, [overrides(tmp_path / "kimi_ep2", "kimi-linear-tiny",
                                   **_pp(**{"parallel.pp": 2, "parallel.ep": 2}, **kimi))])
    for name in runs:
        assert_same_run(tmp_path / name, tmp_path / f"ref_{name}", f"pp2 {name}")
    assert_same_run(tmp_path / "kimi_ep2", tmp_path / "ref_kimi", "pp2 × ep2 kimi")
    aux = [r["aux_loss"] for r in train_records(tmp_path / "kimi")]
    assert aux == pytest.approx([r["aux_loss"] for r in train_records(tmp_path / "ref_kimi")], rel=1e-5)
    assert all(a > 0 for a in aux)
    # Each stage's layers log their routing metrics (rank 0 holds only the first stage's layers).
    for got, want in zip(train_records(tmp_path / "kimi"), train_records(tmp_path / "ref_kimi")):
        per_layer = {k: v for k, v in want.items() if k.startswith("moe/")}
        assert len({k.split("/")[1] for k in per_layer}) == 3  # the three MoE layers of kimi-linear-tiny
        assert {k: v for k, v in got.items() if k.startswith("moe/")} == pytest.approx(per_layer, rel=1e-5)


def _resume(src: Path, dst: Path, step: int = 3) -> None:
    shutil.copytree(src / "checkpoints" / f"step_{step}", dst / "checkpoints" / f"step_{step}")


@pytest.mark.slow
def test_pipelined_checkpoints_reshard_across_pp(tmp_path):
    """Saved at pp 2 (step 3), resumed at pp 1, pp 4 and dp_shard 2 × tp 2; a pp 1 checkpoint
    resumed at pp 2 × tp 2: each continues the uninterrupted trajectory."""
    preset = "llama-tiny"
    ref = run_one_process(tmp_path / "ref", preset, **_pp())
    launch(tmp_path, 2, [overrides(tmp_path / "pp2", preset, **_pp(**{"parallel.pp": 2}))])
    for dst in ("to_pp1", "to_pp4", "to_dp2tp2"):
        _resume(tmp_path / "pp2", tmp_path / dst)
    _resume(tmp_path / "ref", tmp_path / "pp1_to_pp2tp2")
    resumed = run_one_process(tmp_path / "to_pp1", preset, **LR)
    launch(tmp_path, 4, [overrides(tmp_path / "to_pp4", preset, **LR, **{"parallel.pp": 4}),
                         overrides(tmp_path / "to_dp2tp2", preset, **LR, **{"parallel.dp_shard": 2, "parallel.tp": 2}),
                         overrides(tmp_path / "pp1_to_pp2tp2", preset, **LR, **{"parallel.pp": 2, "parallel.tp": 2})])
    assert [r["step"] for r in resumed] == [4, 5]
    for name in ("to_pp1", "to_pp4", "to_dp2tp2", "pp1_to_pp2tp2"):
        got = [r for r in train_records(tmp_path / name) if r["step"] > 3]
        assert_same_trajectory(got, ref[3:], name)
