"""Pipeline parallelism in the planner and the rehearsal: the schedules' activation depth is torch's, pp
layouts are enumerated and valid, bubbles follow the schedules' formulas, and each pp rank's planned
memory agrees with its rehearsal (the real stage build and step under fake tensors)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from braid.config import load_config
from braid.parallel.mesh import check_world
from braid.parallel.pipeline import stashed_micro_batches
from braid.plan.comm import Links
from braid.plan.cost import project
from braid.plan.hardware import gpu_kind
from braid.plan.layout import Layout, apply_layout
from braid.plan.memory import estimate_memory
from braid.plan.planner import enumerate_layouts, load_efficiency, model_cost, plan
from braid.plan.stages import rank_parts
from conftest import ROOT


def _held_at_peak(ops) -> dict:
    """Per stage, the micro-batches whose activations are held when the total held is largest: +1 at a
    forward, −1 at a full backward or a weight gradient (an input gradient keeps what the weight one needs)."""
    from torch.distributed.pipelining.schedules import _ComputationType as C

    held: dict = {}
    best, at = -1, {}
    for a in ops:
        if a is None:
            continue
        if a.computation_type == C.FORWARD:
            held[a.stage_index] = held.get(a.stage_index, 0) + 1
        elif a.computation_type in (C.FULL_BACKWARD, C.BACKWARD_WEIGHT):
            held[a.stage_index] -= 1
        if sum(held.values()) > best:
            best, at = sum(held.values()), dict(held)
    return at


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_stashed_micro_batches_are_torch_schedules_depth(pp):
    from torch.distributed.pipelining import schedules

    for m in sorted({pp, 2 * pp, 3 * pp, 2 * pp - 1, 7}):
        for r in range(pp):
            if m % max(1, m // pp) == 0:  # what ScheduleInterleaved1F1B accepts
                me = SimpleNamespace(n_local_stages=2, microbatches_per_round=m // max(1, m // pp),
                                     pp_group_size=pp, _n_microbatches=m)
                ops = schedules.ScheduleInterleaved1F1B._calculate_single_rank_operations(me, r)
                assert _held_at_peak(ops) == stashed_micro_batches("interleaved_1f1b", r, pp, 2, m), (pp, m, r)
            me = SimpleNamespace(pp_group_size=pp, _n_microbatches=m, num_stages=2 * pp)
            ops = schedules.ScheduleZBVZeroBubble._calculate_single_rank_operations(me, r)
            assert _held_at_peak(ops) == stashed_micro_batches("zbv", r, pp, 2, m), (pp, m, r)
            assert stashed_micro_batches("1f1b", r, pp, 1, m) == {r: min(m, pp - r)}
            assert stashed_micro_batches("gpipe", r, pp, 1, m) == {r: m}


def test_pipeline_layouts_are_enumerated_and_valid():
    small = ["model.preset=hybrid-tiny", "data.seq_len=256", "train.global_batch_size=16", "train.micro_batch_size=1"]
    base = load_config(None, small)
    layouts = list(enumerate_layouts(base, 4, 8))
    pipelined = {(lay.pp, lay.pp_schedule) for lay in layouts if lay.pp > 1}
    assert pipelined == {(p, s) for p in (2, 4) for s in ("gpipe", "1f1b", "interleaved_1f1b", "zbv")} - {
        (4, "interleaved_1f1b"), (4, "zbv")}  # 6 layers: 8 stages do not fit
    seen = set()
    for lay in layouts:
        if lay.pp > 1 and (lay.pp, lay.pp_schedule, lay.micro_batch) not in seen:
            seen.add((lay.pp, lay.pp_schedule, lay.micro_batch))
            cfg = load_config(None, small + lay.overrides())  # as a user writes it
            dims = check_world(cfg, 4)
            assert (dims.pp, cfg.parallel.pp_schedule) == (lay.pp, lay.pp_schedule)
            assert "pp" in lay.label()
    # DeepSpeed runs without a pipeline
    assert all(lay.pp == 1 for lay in enumerate_layouts(load_config(None, small + ["parallel.engine=deepspeed"]), 4, 8))


def _links(kind: str = "h100-sxm"):
    eff, eager = load_efficiency(kind)
    return Links(gpu_kind(kind), 8, eff["nvlink"], eff["ib"]), eff, eager


def test_bubbles_follow_the_schedules():
    cfg = load_config(None, ["model.preset=llama", "data.seq_len=4096", "train.global_batch_size=64",
                             "data.tokenizer=bytes"])
    cost = model_cost(cfg)
    links, eff, eager = _links()

    def proj(schedule, ac="none", pp=4):
        lay = Layout(1, 4, 1, 1, 1, "-", ac, 1, pp, schedule)
        return project(apply_layout(cfg, lay), cost, lay, links, eff, eager)

    m = 64 // 4
    flat = proj("-", pp=1)
    assert flat.bubble_s == 0
    one, gpipe, inter, zbv = proj("1f1b"), proj("gpipe"), proj("interleaved_1f1b"), proj("zbv")
    for p in (one, gpipe, inter, zbv):
        assert p.step_s == pytest.approx(p.compute_s + p.exposed_comm_s + p.bubble_s)
    # 1F1B and gpipe: (p − 1) micro-batch times of the slowest rank, the (p − 1)/(m + p − 1) of a step
    assert one.bubble_s == pytest.approx(gpipe.bubble_s)
    busy = one.step_s - one.bubble_s
    assert one.bubble_s / one.step_s == pytest.approx(3 / (m + 3), rel=0.05)
    assert one.bubble_s == pytest.approx(3 * busy / m, rel=0.05)
    # interleaved: v = 2 stages per rank halve it; zbv leaves only the weightless work's and recomputation's
    assert inter.bubble_s == pytest.approx(one.bubble_s / 2, rel=0.1)
    assert 0 < zbv.bubble_s < inter.bubble_s / 2
    assert proj("zbv", ac="full").bubble_s > zbv.bubble_s
    # gpipe keeps every micro-batch's activations, 1F1B at most pp of them
    assert gpipe.memory.activations_bytes > 3 * one.memory.activations_bytes
    # each rank holds a quarter of the layers: the model states shrink with pp
    assert one.memory.params_bytes < flat.memory.params_bytes / 3


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "interleaved_1f1b", "zbv"])
def test_each_pp_rank_memory_matches_its_rehearsal(schedule):
    """Every pp rank of pp 2 × dp_shard 2 (attention-only tiny preset): the planner's model states of the
    rank's stages equal the rehearsed ones exactly, its activations (the schedule's depth of micro-batches)
    are in the band the planner keeps for one micro-batch without a pipeline (tests/test_plan.py)."""
    from braid.rehearse import rehearse

    base = load_config(None, ["model.preset=tiny", "data.seq_len=256", "train.global_batch_size=16",
                              "train.micro_batch_size=2"])
    cost = model_cost(base)
    lay = Layout(1, 2, 1, 1, 1, "-", "none", 2, 2, schedule)
    cfg = apply_layout(base, lay)
    parts = rank_parts(cfg, cost, lay, 4)
    assert sum(len(p.layers) for p in parts) == len(cost.layers)
    for part in parts:
        est = estimate_memory(cfg, cost, lay, 80 * 2**30, part)
        r = rehearse(cfg, 4, part.rank * 2, 80 * 2**30, vocab=cost.vocab)  # pp is the outermost mesh dim
        assert r.layout["pp"] == 2 and r.layout["pp_schedule"] == schedule
        assert r.params_bytes == est.params_bytes and r.grads_bytes == est.grads_bytes
        assert 0.6 <= est.activations_bytes / r.activations_peak_bytes <= 1.05, part
        sends = [c for c in r.collectives if c["op"] == "send" and c["group"] == "pp"]
        assert len(sends) == 1 and sends[0]["count"] % 4 == 0


@pytest.mark.slow
def test_best_pipelined_layout_of_llama_rehearses_and_fits():
    """llama (8B) on 16 H100s: pipelined layouts are planned; the best of them, rehearsed on its first and
    last pp ranks (the real stage build and step under the fake process group), fits with the model states
    the planner counted for those ranks."""
    args = ["model.preset=llama", "data.tokenizer=bytes", "train.global_batch_size=64", "data.seq_len=8192"]
    cfg = load_config(None, args)
    cost = model_cost(cfg)
    result = plan(cfg, 16, gpu_kind("h100-sxm"))
    best = next(p for p in result.ranked if p.layout.pp > 1)
    assert best.bubble_s > 0
    lay_cfg = apply_layout(cfg, best.layout)
    parts = rank_parts(lay_cfg, cost, best.layout, 64 // (best.layout.dp * best.layout.micro_batch))
    for part in (parts[0], parts[-1]):
        rank = part.rank * (16 // best.layout.pp)
        out = subprocess.run([sys.executable, "-m", "braid.rehearse", "--config", str(ROOT / "configs" / "tiny.yaml"),
                              *args, *best.layout.overrides(), "--world-size", "16", "--rank", str(rank)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        doc = json.loads(out.stdout)
        assert doc["fits"] and doc["layout"]["pp"] == best.layout.pp
        assert doc["params_bytes"] == estimate_memory(lay_cfg, cost, best.layout, 80 * 2**30, part).params_bytes
