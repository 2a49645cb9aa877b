"""Settings that may change on resume (README, Checkpoints: what may change on resume) change with one line
and keep the counters right; checkpoints from before they described themselves still resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from braid.config import load_config
from braid.errors import ConfigError
from braid.trainer.checkpoint_layout import MARKER
from braid.trainer.trainer import Trainer
from conftest import tiny_overrides

BASE = {"train.steps": 4, "checkpoint.interval": 2}


def run(run_dir: Path, **extra) -> Trainer:
    trainer = Trainer(load_config(None, tiny_overrides(run_dir, **{**BASE, **extra})))
    trainer.train()
    return trainer


def records(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    run(run_dir)
    return run_dir


def test_batch_size_and_steps_change_with_one_line(made, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(made, run_dir)
    capsys.readouterr()
    trainer = run(run_dir, **{"train.steps": 6, "train.global_batch_size": 8, "train.lr": 1e-3})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "changed settings" in ln]
    assert lines == ["braid: resuming step_4 with changed settings: train.steps 4 -> 6, "
                     "train.global_batch_size 4 -> 8, train.lr 0.003 -> 0.001"]
    got = records(run_dir)
    # 4 iterations of 4 samples, then 8 per iteration; 32 tokens each.
    assert [(got[s]["consumed_samples"], got[s]["consumed_tokens"]) for s in (4, 5, 6)] == \
        [(16, 512), (24, 768), (32, 1024)]
    assert trainer.consumed_tokens == 1024
    info = json.loads((run_dir / "checkpoints" / "step_6" / "braid.json").read_text())
    assert (info["consumed_samples"], info["consumed_tokens"], info["layout"]["world_size"]) == (32, 1024, 1)
    assert "global_batch_size: 8" in (run_dir / "checkpoints" / "step_6" / "config.yaml").read_text()
    assert "global_batch_size: 4" in (run_dir / "checkpoints" / "step_4" / "config.yaml").read_text()


def test_unchanged_resume_says_nothing(made, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(made, run_dir)
    capsys.readouterr()
    run(run_dir)  # a requeued job after the end: the same command
    out = capsys.readouterr().out
    assert "changed settings" not in out and "resumed from" in out and "done at iteration 4" in out


def _as_old_checkpoint(ckpt: Path) -> None:
    """What checkpoints looked like before they carried config.yaml and braid.json."""
    for name in ("config.yaml", "braid.json"):
        (ckpt / name).unlink()
    meta = json.loads((ckpt / MARKER).read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if k not in ("config.yaml", "braid.json")}
    (ckpt / MARKER).write_text(json.dumps(meta) + "\n")


def test_old_checkpoint_falls_back_to_the_run_config(made, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(made, run_dir)
    _as_old_checkpoint(run_dir / "checkpoints" / "step_4")
    with pytest.raises(ConfigError, match="'data.seq_len' = 64 differs"):
        Trainer(load_config(None, tiny_overrides(run_dir, **{**BASE, "data.seq_len": 64})))
    trainer = run(run_dir, **{"train.steps": 5})
    assert trainer.consumed_tokens == 20 * 32 and records(run_dir)[5]["consumed_tokens"] == 640


def test_resuming_an_older_checkpoint_keeps_what_it_saves(made, tmp_path):
    # A rollback: newer checkpoints exist; pruning must not count them and delete the one just saved.
    run_dir = tmp_path / "run"
    shutil.copytree(made, run_dir)
    run(run_dir, **{"train.steps": 3, "checkpoint.interval": 1, "checkpoint.keep": 1,
                    "checkpoint.resume": str(run_dir / "checkpoints" / "step_2")})
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_3" and (ckpts / "step_3" / MARKER).is_file()
    assert not (ckpts / "step_2").exists()
