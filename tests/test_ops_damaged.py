"""resume=auto falls back past damaged checkpoints and says so; braid.inspect shows the damage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from braid.config import load_config
from braid.errors import ConfigError
from braid.inspect import summarize
from braid.trainer.checkpoint_layout import complete_checkpoints
from braid.trainer.trainer import Trainer
from conftest import ROOT, tiny_overrides


def run(run_dir: Path, **extra) -> tuple[Trainer, list[float]]:
    trainer = Trainer(load_config(None, tiny_overrides(run_dir, **{"checkpoint.interval": 2, **extra})))
    return trainer, trainer.train()


def shard(ckpt: Path) -> Path:
    return next(ckpt.glob("*.distcp"))


def test_resume_auto_falls_back_past_damaged_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "r"
    _, full = run(run_dir, **{"train.steps": 6})
    ckpts = run_dir / "checkpoints"
    # step_6: a shard cut short (caught by the sizes in the marker); step_4: same size, garbage
    # metadata (caught only by loading).
    data = shard(ckpts / "step_6").read_bytes()
    shard(ckpts / "step_6").write_bytes(data[: len(data) // 2])
    meta = ckpts / "step_4" / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)
    capsys.readouterr()

    report = summarize(run_dir)
    problems = {c["step"]: c["problem"] for c in report["checkpoints"]}
    assert problems[2] is None and problems[4] is None and "bytes" in problems[6]
    out = subprocess.run([sys.executable, "-m", "braid.inspect", str(run_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60).stdout
    assert "DAMAGED" in out and shard(ckpts / "step_6").name in out

    trainer, rest = run(run_dir, **{"train.steps": 6})
    assert rest == full[2:]  # resumed from step_2, bit-identical from there
    said = capsys.readouterr().out
    assert "step_6" in said and "step_4" in said and "falling back to step_2" in said
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2, 4, 6]  # rewritten by the resumed run
    assert (ckpts / "step_6.damaged").is_dir() and (ckpts / "step_4.damaged").is_dir()
    assert [c["step"] for c in summarize(run_dir)["set_aside_checkpoints"]] == [4, 6]


def test_checkpoints_that_no_longer_fit_are_an_error_not_damage(tmp_path):
    run_dir = tmp_path / "r"
    run(run_dir, **{"train.steps": 4})
    # The checkpoint's own config says so before anything loads (it used to surface as a load failure).
    with pytest.raises(ConfigError, match=r"'model.d_model' = 96 differs from checkpoint .*trained with 64"):
        run(run_dir, **{"train.steps": 6, "model.d_model": 96})
    # Nothing was set aside: the checkpoints are fine, the model changed.
    ckpts = run_dir / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2, 4] and not list(ckpts.glob("*.damaged"))


def test_marker_records_every_file_size(tmp_path):
    run_dir = tmp_path / "r"
    run(run_dir, **{"train.steps": 2})
    ckpt = run_dir / "checkpoints" / "step_2"
    files = json.loads((ckpt / "COMPLETE").read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    on_disk.pop("COMPLETE")
    assert files == on_disk and "rng_rank0.pt" in files and ".metadata" in files
