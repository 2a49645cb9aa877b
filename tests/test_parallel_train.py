"""Parallel layouts give one process's trajectory: FSDP2, HSDP, DeepSpeed ZeRO-1/2/3 (+ CPU offload),
activation checkpointing, FSDP2 with expert and tensor parallelism, and resharding resume (gloo,
torchrun subprocesses on CPU).

Every multi-process test launches torchrun once and runs several layouts in that one launch (this
file is also the worker: ``torchrun tests/test_parallel_train.py jobs.json``), then compares each
run's per-step losses with a single-process run of the same global batch: fp32 on CPU, relative
difference ≤ 1e-5 per step (reduction order is the only difference); gradient norms ≤ 1e-4.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run by torchrun as the worker
    sys.path.insert(0, str(ROOT))

PRESETS = ["tiny", "tiny-swa", "llama-tiny", "gated-attn-tiny", "gated-attn-moe-tiny", "moe-tiny",
           "fox-pro-tiny", "kimi-linear-tiny", "hymba-tiny", "hybrid-tiny", "gdn-tiny"]
MOE_PRESETS = ["gated-attn-moe-tiny", "moe-tiny", "kimi-linear-tiny", "hybrid-tiny", "gdn-tiny"]
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4


def overrides(run_dir: Path, preset: str, **extra) -> list[str]:
    """5 steps of a ``*-tiny`` preset, global batch 4 of 32 tokens (micro 1: accumulation 4 / 2 / 1
    on 1 / 2 / 4 data-parallel ranks)."""
    base = {
        "run.dir": str(run_dir),
        "model.preset": preset,
        "data.seq_len": 32,
        "train.steps": 5,
        "train.micro_batch_size": 1,
        "train.global_batch_size": 4,
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.eval_interval": 100,  # one evaluation, at the last step
        "train.eval_iters": 1,
        "train.threads": 1,
        "checkpoint.interval": 100,
        "checkpoint.keep": 10,
        "logging.interval": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def eval_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["eval_loss"] for r in map(json.loads, lines) if "eval_loss" in r]


def run_one_process(run_dir: Path, preset: str, **extra) -> list[dict]:
    from braid.config import load_config
    from braid.trainer.trainer import Trainer

    Trainer(load_config(None, overrides(run_dir, preset, **extra))).train()
    return train_records(run_dir)


def launch(tmp: Path, nproc: int, jobs: list[list[str]], timeout: int = 280) -> None:
    """Run every job (a list of overrides) one after another in one torchrun launch of ``nproc``.

    The default timeout stays under pytest's per-test 300 s: a test that needs more is a matrix to split
    into parametrized cases, not a longer timeout."""
    spec = tmp / f"jobs_{nproc}.json"
    spec.write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), str(spec)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def assert_same_trajectory(got: list[dict], ref: list[dict], what: str, norm_rtol: float = NORM_RTOL) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref], what
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"{what}: step {a['step']} loss"
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=norm_rtol), f"{what}: step {a['step']} grad norm"


# --------------------------------------------------------------------------------------- layouts

TWO_PROC_LAYOUTS = {
    "fsdp_dp_shard2": {"parallel.dp_shard": 2},
    "fsdp_dp_shard2_ac": {"parallel.dp_shard": 2, "parallel.activation_checkpoint": "full"},
    "zero1": {"parallel.engine": "deepspeed", "parallel.zero_stage": 1},
    "zero3": {"parallel.engine": "deepspeed", "parallel.zero_stage": 3},
    "zero2_offload": {"parallel.engine": "deepspeed", "parallel.zero_stage": 2, "parallel.cpu_offload": "true"},
    "ep2": {"parallel.ep": 2},  # FSDP2 + experts sharded over both data ranks
}
FOUR_PROC_LAYOUTS = {
    "hsdp_2x2": {"parallel.dp_replicate": 2, "parallel.dp_shard": 2},
    "fsdp_dp_shard4": {"parallel.dp_shard": 4},
    "ep2_dp4": {"parallel.ep": 2},  # expert replicas on 2 ranks each: their gradients summed by hand
    "ep2_hsdp_2x2": {"parallel.dp_replicate": 2, "parallel.dp_shard": 2, "parallel.ep": 2},
    "ep4": {"parallel.ep": 4},
}


# The slow matrices (every preset × every layout) run 3 steps, not 5: steps 1-2 warm up, step 3 decays, and
# the evaluation follows a third update; the two steps more cost CI ~10 minutes over some 150 runs.
MATRIX = {"train.steps": 3}


def check_matrix(tmp: Path, cases: list[tuple[str, str, int]]) -> None:
    """``cases``: (preset, layout name, nproc). One reference run per preset, one launch per nproc."""
    refs = {p: run_one_process(tmp / f"ref_{p}", p, **MATRIX) for p in sorted({c[0] for c in cases})}
    for nproc in sorted({c[2] for c in cases}):
        layouts = TWO_PROC_LAYOUTS if nproc == 2 else FOUR_PROC_LAYOUTS
        chosen = [c for c in cases if c[2] == nproc]
        launch(tmp, nproc, [overrides(tmp / f"{p}_{name}", p, **layouts[name], **MATRIX) for p, name, _ in chosen])
        for p, name, _ in chosen:
            assert_same_trajectory(train_records(tmp / f"{p}_{name}"), refs[p], f"{p} {name}")
            assert eval_losses(tmp / f"{p}_{name}") == pytest.approx(eval_losses(tmp / f"ref_{p}"), rel=LOSS_RTOL)


FAST_CASES = [("llama-tiny", "fsdp_dp_shard2"), ("moe-tiny", "fsdp_dp_shard2_ac"), ("llama-tiny", "zero3"),
              ("moe-tiny", "zero1"), ("moe-tiny", "ep2")]
# DeepSpeed is optional (the GPU image has none, `make compat` checks that image's versions): its layouts skip.
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED,
                                     reason="deepspeed is not installed (optional; the GPU image lacks it)")


def _runnable(layout: str) -> bool:
    return HAS_DEEPSPEED or TWO_PROC_LAYOUTS[layout].get("parallel.engine") != "deepspeed"


def _cases(cases: list[tuple[str, str]]) -> list:
    return [pytest.param(p, name, marks=[] if _runnable(name) else [needs_deepspeed]) for p, name in cases]


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory) -> Path:
    """The default-run subset in one 2-process launch: a dense and a MoE preset under FSDP2 (with and
    without AC) and ZeRO-1/3; the FSDP2 runs also checkpoint at step 3 (for resharding)."""
    tmp = tmp_path_factory.mktemp("parallel")
    for preset in sorted({p for p, _ in FAST_CASES}):
        run_one_process(tmp / f"ref_{preset}", preset)
    run_one_process(tmp / "ref_nan", "moe-tiny", **NAN_STEP)
    launch(tmp, 2, [overrides(tmp / f"{p}_{name}", p, **TWO_PROC_LAYOUTS[name], **{"checkpoint.interval": 3})
                    for p, name in FAST_CASES if _runnable(name)] +
           [overrides(tmp / f"nan_{name}", "moe-tiny", **TWO_PROC_LAYOUTS[name], **NAN_STEP) for name in NAN_LAYOUTS
            if _runnable(name)])
    return tmp


NAN_STEP = {"train.debug_nan_steps": "[2]"}
NAN_LAYOUTS = ["zero1", "zero3"]


@needs_deepspeed
@pytest.mark.parametrize("layout", NAN_LAYOUTS)
def test_deepspeed_skips_a_non_finite_step_like_one_process(fast_runs, layout):
    """Megatron semantics under ZeRO too: the poisoned iteration 2 counts but changes no weight or
    optimizer state (DeepSpeed alone would apply NaN gradients), so the run goes on as one process does."""
    got, ref = train_records(fast_runs / f"nan_{layout}"), train_records(fast_runs / "ref_nan")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4, 5]
    assert math.isnan(got[1]["loss"]) and math.isnan(ref[1]["loss"])
    for a, b in zip(got, ref):
        assert (a["skipped_iterations"], a["nan_iterations"]) == (b["skipped_iterations"], b["nan_iterations"])
        if a["step"] != 2:
            assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"{layout}: step {a['step']} loss"
    assert (got[-1]["skipped_iterations"], got[-1]["nan_iterations"]) == (1, 1)


@pytest.mark.parametrize("preset,layout", _cases(FAST_CASES))
def test_two_processes_match_one_process(fast_runs, preset, layout):
    assert_same_trajectory(train_records(fast_runs / f"{preset}_{layout}"), train_records(fast_runs / f"ref_{preset}"),
                           f"{preset} {layout}")
    assert eval_losses(fast_runs / f"{preset}_{layout}") == pytest.approx(eval_losses(fast_runs / f"ref_{preset}"),
                                                                         rel=LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_layout_matches_one_process(tmp_path, preset):
    """Every 2-rank layout above for one preset (expert layouts for the MoE presets only); the 4-rank ones
    for the MoE presets and llama-tiny. A dense preset's FSDP at 4 ranks or 2 × 2 is its FSDP at 2 with
    other mesh sizes (no mixer code differs), and those launches cost CI minutes."""
    def applies(name: str) -> bool:  # expert parallelism needs experts
        return not name.startswith("ep") or preset in MOE_PRESETS

    cases = [(preset, name, 2) for name in TWO_PROC_LAYOUTS if applies(name)]
    if preset in MOE_PRESETS or preset == "llama-tiny":
        cases += [(preset, name, 4) for name in FOUR_PROC_LAYOUTS if applies(name)]
    check_matrix(tmp_path, cases)


@pytest.mark.slow
def test_hsdp_four_processes_match_one_process(tmp_path):
    check_matrix(tmp_path, [("hybrid-tiny", "hsdp_2x2", 4)])


@pytest.mark.slow
def test_hyper_connections_match_one_process(tmp_path):
    """``model.connection=hc`` (static + dynamic, mHC Sinkhorn) under FSDP2 + AC, HSDP and ZeRO-1/3."""
    hc = {"model.connection": "hc", "model.hc.dynamic": "true", "model.hc.sinkhorn_iters": 3}
    ref = run_one_process(tmp_path / "ref", "hybrid-tiny", **hc)
    launch(tmp_path, 2, [overrides(tmp_path / "fsdp", "hybrid-tiny", **hc, **TWO_PROC_LAYOUTS["fsdp_dp_shard2_ac"])])
    launch(tmp_path, 4, [overrides(tmp_path / "hsdp", "hybrid-tiny", **hc, **FOUR_PROC_LAYOUTS["hsdp_2x2"])])
    launch(tmp_path, 2, [overrides(tmp_path / name, "hybrid-tiny", **hc, **TWO_PROC_LAYOUTS[name])
                         for name in ("zero1", "zero3")])
    for n in ("fsdp", "hsdp", "zero1", "zero3"):
        assert_same_trajectory(train_records(tmp_path / n), ref, f"hc {n}")


# ------------------------------------------------------------------------------------ resharding

def _resume_from(src: Path, dst: Path, step: int) -> None:
    """What a run killed after ``step`` leaves on disk."""
    shutil.copytree(src / "checkpoints" / f"step_{step}", dst / "checkpoints" / f"step_{step}")


def test_resharding_resume_dp_shard2_to_one_process(fast_runs, tmp_path):
    """Saved under FSDP2 dp_shard 2 at step 3, resumed by one process: steps 4-5 follow the
    uninterrupted trajectory (DCP reshards the DTensor shards into plain tensors)."""
    _resume_from(fast_runs / "llama-tiny_fsdp_dp_shard2", tmp_path / "resumed", 3)
    resumed = run_one_process(tmp_path / "resumed", "llama-tiny")
    assert [r["step"] for r in resumed] == [4, 5]
    assert_same_trajectory(resumed, train_records(fast_runs / "ref_llama-tiny")[3:], "dp_shard 2 → 1 resume")


@needs_deepspeed
def test_mismatched_layout_is_a_one_line_error(fast_runs, tmp_path):
    """A DeepSpeed checkpoint loaded under FSDP2 is refused in one line naming both engines."""
    from braid.config import load_config
    from braid.errors import CheckpointError
    from braid.trainer.trainer import Trainer

    ds_ckpt = fast_runs / "llama-tiny_zero3" / "checkpoints" / "step_3"
    trainer = Trainer(load_config(None, overrides(tmp_path / "x", "llama-tiny", **{"checkpoint.resume": str(ds_ckpt)})))
    with pytest.raises(CheckpointError, match=r"parallel.engine=deepspeed.*cannot be loaded") as err:
        trainer.train()
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_resharding_resume_dp_shard4_to_dp_shard2_and_to_tp(tmp_path):
    """Saved under dp_shard 4 at step 2; resumed under dp_shard 2 (2 ranks) and under
    dp_shard 2 × tp 2 (4 ranks): both continue the uninterrupted trajectory."""
    preset = "hybrid-tiny"
    ref = run_one_process(tmp_path / "ref", preset)
    launch(tmp_path, 4, [overrides(tmp_path / "four", preset, **{"parallel.dp_shard": 4, "checkpoint.interval": 2})])
    _resume_from(tmp_path / "four", tmp_path / "two", 2)
    _resume_from(tmp_path / "four", tmp_path / "tp", 2)
    launch(tmp_path, 2, [overrides(tmp_path / "two", preset, **{"parallel.dp_shard": 2})])
    launch(tmp_path, 4, [overrides(tmp_path / "tp", preset, **{"parallel.dp_shard": 2, "parallel.tp": 2})])
    assert_same_trajectory([r for r in train_records(tmp_path / "two") if r["step"] > 2], ref[2:], "4 → 2")
    assert_same_trajectory([r for r in train_records(tmp_path / "tp") if r["step"] > 2], ref[2:], "4 → 2×tp2")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama-tiny", "hybrid-tiny"])
def test_tensor_parallel_with_fsdp_matches_one_process(tmp_path, preset):
    """The trainer side of TP (the plans are tested with tensor_parallel.py): tp 2 alone, with and
    without sequence parallelism, and dp_shard 2 × tp 2 (FSDP2 over DTensor shards)."""
    ref = run_one_process(tmp_path / "ref", preset)
    two = {"tp2": {"parallel.tp": 2}, "tp2_nosp": {"parallel.tp": 2, "parallel.sequence_parallel": "false"}}
    launch(tmp_path, 2, [overrides(tmp_path / k, preset, **v) for k, v in two.items()])
    launch(tmp_path, 4, [overrides(tmp_path / "dp2_tp2", preset, **{"parallel.dp_shard": 2, "parallel.tp": 2})])
    for k in [*two, "dp2_tp2"]:
        assert_same_trajectory(train_records(tmp_path / k), ref, f"{preset} {k}")


@pytest.mark.slow
def test_tensor_and_expert_parallel_together_match_one_process(tmp_path):
    """4 ranks, dp_shard 2 × tp 2 with ep 2: experts over the two data ranks and every expert's hidden
    units over tp (2-D (ep, tp) DTensors), attention heads over tp, FSDP2 over the data ranks; with and
    without sequence parallelism. 5 steps of moe-tiny give one process's losses and gradient norms."""
    preset = "moe-tiny"
    ref = run_one_process(tmp_path / "ref", preset)
    layouts = {"tp2_ep2": {"parallel.dp_shard": 2, "parallel.tp": 2, "parallel.ep": 2},
               "tp2_ep2_nosp": {"parallel.dp_shard": 2, "parallel.tp": 2, "parallel.ep": 2,
                                "parallel.sequence_parallel": "false"}}
    launch(tmp_path, 4, [overrides(tmp_path / k, preset, **v) for k, v in layouts.items()])
    for k in layouts:
        assert_same_trajectory(train_records(tmp_path / k), ref, f"{preset} {k}")
        assert eval_losses(tmp_path / k) == pytest.approx(eval_losses(tmp_path / "ref"), rel=LOSS_RTOL)


@pytest.mark.slow
def test_deepspeed_resume_same_layout(tmp_path):
    """ZeRO-3 checkpoints resume (same world size) and continue the same trajectory."""
    preset = "llama-tiny"
    ref = run_one_process(tmp_path / "ref", preset)
    ds = {"parallel.engine": "deepspeed", "parallel.zero_stage": 3}
    launch(tmp_path, 2, [overrides(tmp_path / "full", preset, **ds, **{"checkpoint.interval": 3})])
    _resume_from(tmp_path / "full", tmp_path / "resumed", 3)
    launch(tmp_path, 2, [overrides(tmp_path / "resumed", preset, **ds)])
    assert_same_trajectory([r for r in train_records(tmp_path / "resumed") if r["step"] > 3], ref[3:], "ZeRO-3 resume")


# ---------------------------------------------------------------------------------------- worker

def _worker(spec: str) -> None:
    from braid.config import load_config
    from braid.parallel.distributed import init_distributed, shutdown
    from braid.trainer.trainer import Trainer

    info = init_distributed("cpu")
    try:
        for job in json.loads(Path(spec).read_text()):
            Trainer(load_config(None, job), info).train()
    finally:
        shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1])


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_tensor_parallel_matches_one_process(tmp_path, preset):
    """tp 2 (sequence parallel) and dp_shard 2 × tp 2 through the trainer, for every ``*-tiny`` preset
    (tiny-swa's single kv head is replicated on both tp ranks)."""
    ref = run_one_process(tmp_path / "ref", preset, **MATRIX)
    launch(tmp_path, 2, [overrides(tmp_path / "tp2", preset, **{"parallel.tp": 2}, **MATRIX)])
    launch(tmp_path, 4, [overrides(tmp_path / "dp2tp2", preset, **{"parallel.dp_shard": 2, "parallel.tp": 2},
                                   **MATRIX)])
    for name in ("tp2", "dp2tp2"):
        assert_same_trajectory(train_records(tmp_path / name), ref, f"{preset} {name}")


def test_deepspeed_client_optimizer_guard_skips_non_finite_gradients():
    """The guard for DeepSpeed's bf16 path (which applies NaN gradients): a non-finite gradient leaves
    weights and optimizer state alone and says so; a finite one steps."""
    import torch

    from braid.parallel.deepspeed_engine import skip_non_finite_steps

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    skip_non_finite_steps(opt, torch.device("cpu"))
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.skipped_last and torch.equal(w.detach(), torch.ones(3)) and not opt.state
    w.grad = torch.tensor([1.0, 1.0, 0.0])
    opt.step()
    assert not opt.skipped_last and w[0].item() < 1.0 and opt.state[w]["step"] == 1


@pytest.mark.slow
def test_muon_dp_shard2_tp2_matches_one_process(tmp_path):
    """train.optimizer=muon on FSDP2 × TP DTensors (each matrix's update gathered for Newton–Schulz, every
    rank keeping its slice): 4 ranks give one process's losses and gradient norms."""
    preset, muon = "llama-tiny", {"train.optimizer": "muon", "train.lr": 1e-2}
    ref = run_one_process(tmp_path / "ref", preset, **muon)
    launch(tmp_path, 4, [overrides(tmp_path / "dp2_tp2", preset, **muon,
                                   **{"parallel.dp_shard": 2, "parallel.tp": 2})])
    assert_same_trajectory(train_records(tmp_path / "dp2_tp2"), ref, f"{preset} muon dp2_tp2")
    adamw = run_one_process(tmp_path / "adamw", preset, **{"train.lr": 1e-2})
    assert abs(adamw[-1]["loss"] - ref[-1]["loss"]) > 1e-3  # the runs above did train with Muon


@pytest.mark.slow
def test_ngpt_dp_shard2_matches_one_process(tmp_path):
    """model.connection=ngpt under FSDP2: rows normalised per shard, output-projection columns (the
    sharded dim) gathered; 2 ranks give one process's trajectory."""
    preset, ngpt = "llama-tiny", {"model.connection": "ngpt", "train.lr": 1e-2}
    ref = run_one_process(tmp_path / "ref", preset, **ngpt)
    launch(tmp_path, 2, [overrides(tmp_path / "dp2", preset, **ngpt, **{"parallel.dp_shard": 2})])
    assert_same_trajectory(train_records(tmp_path / "dp2"), ref, f"{preset} ngpt dp2")


@pytest.mark.slow
def test_muon_with_experts_dp_shard2_ep2_matches_one_process(tmp_path):
    """Muon on the experts' stacked matrices (one Newton–Schulz per expert) with experts sharded over
    the two data ranks (ep 2), KDA and gated attention around them: one process's trajectory."""
    preset, muon = "hybrid-tiny", {"train.optimizer": "muon", "train.lr": 1e-2}
    ref = run_one_process(tmp_path / "ref", preset, **muon)
    launch(tmp_path, 2, [overrides(tmp_path / "ep2", preset, **muon, **{"parallel.ep": 2})])
    assert_same_trajectory(train_records(tmp_path / "ep2"), ref, f"{preset} muon ep2")
