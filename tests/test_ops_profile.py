"""Where a step's time goes: per-phase timings in metrics.jsonl, profiler traces, memory snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from braid.config import load_config
from braid.errors import ConfigError
from braid.trainer.metrics import PHASES
from braid.trainer.trainer import Trainer
from conftest import tiny_overrides


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_break_each_step_into_phases(tmp_path):
    run_dir = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides(run_dir, **{"train.steps": 4, "logging.interval": 2}))).train()
    train = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        phases = [r[f"time_{p}_s"] for p in PHASES]
        assert all(x > 0 for x in phases), r
        # The phases are disjoint parts of the timed step (per-step averages over the same window).
        assert sum(phases) <= r["step_time_s"], r


def test_profiler_traces_the_configured_iterations(tmp_path, capsys):
    run_dir = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides(run_dir, **{
        "train.steps": 4, "train.profile_steps": "[2,3]", "train.memory_snapshot_step": 2}))).train()
    traces = list((run_dir / "profile").iterdir())
    assert [p.name for p in traces] == ["trace_iter2-3_rank0.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"braid.forward", "braid.backward", "braid.optimizer"} <= names
    assert any(str(n).startswith("aten::") for n in names)
    out = capsys.readouterr().out
    assert "profiler trace of iterations 2-3 written to" in out
    if not torch.cuda.is_available():  # a clear no-op on CPU
        assert "train.memory_snapshot_step=2 ignored: memory snapshots need CUDA" in out
        assert not (run_dir / "memory").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory snapshots need a GPU")
def test_memory_snapshot_is_written_on_gpu(tmp_path):
    run_dir = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides(run_dir, **{
        "train.steps": 3, "train.memory_snapshot_step": 2, "train.device": "cuda"}))).train()
    snapshot = run_dir / "memory" / "snapshot_iter2_rank0.pickle"
    assert snapshot.is_file() and snapshot.stat().st_size > 0


@pytest.mark.parametrize("override,key", [
    ("train.max_nan_iterations=-1", "train.max_nan_iterations"),
    ("train.loss_spike_window=1", "train.loss_spike_window"),
    ("train.loss_spike_zscore=0", "train.loss_spike_zscore"),
    ("train.profile_steps=[3]", "train.profile_steps"),
    ("train.profile_steps=[4,2]", "train.profile_steps"),
    ("train.profile_steps=[0,2]", "train.profile_steps"),
    ("train.memory_snapshot_step=-2", "train.memory_snapshot_step"),
    ("train.debug_nan_steps=[0]", "train.debug_nan_steps"),
    ("train.timing_sync=maybe", "train.timing_sync"),
])
def test_bad_operations_settings_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)
