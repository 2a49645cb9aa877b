"""resume=auto falls back past damaged checkpoints and says so, one line each; braid.inspect shows the damage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from braid.config import load_config
from braid.errors import ConfigError
from braid.inspect import summarize
from braid.trainer.checkpoint_layout import complete_checkpoints
from braid.trainer.safe_load import read_dcp_metadata
from braid.trainer.trainer import Trainer
from checkpoint_plants import plant_metadata, refresh_manifest
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
    # metadata (caught by its checksum and by reading it, which braid.inspect does too).
    data = shard(ckpts / "step_6").read_bytes()
    shard(ckpts / "step_6").write_bytes(data[: len(data) // 2])
    meta = ckpts / "step_4" / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)
    capsys.readouterr()

    report = summarize(run_dir)
    problems = {c["step"]: c["problem"] for c in report["checkpoints"]}
    assert problems[2] is None and ".metadata is unreadable" in problems[4] and "bytes" in problems[6]
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


def test_train_cli_resumes_past_every_kind_of_damage_with_one_line_each(tmp_path):
    """Through ``python -m braid.train ... checkpoint.resume=auto``: step_10 lacks its marker, step_8 has
    4 KB overwritten at the same size, step_6 garbled metadata, step_4 a planted payload (manifests
    updated to match for those two); the run says so, one line each, and resumes from step_2."""
    run_dir = tmp_path / "r"
    run(run_dir, **{"train.steps": 8})
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step_8", ckpts / "step_10")
    (ckpts / "step_10" / "COMPLETE").unlink()
    info = max(read_dcp_metadata(ckpts / "step_8").storage_data.values(), key=lambda i: i.length)
    with open(ckpts / "step_8" / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        f.write(b"\x00\x00\xc0\x7f" * 1024)  # NaNs, same size
    (ckpts / "step_6" / ".metadata").write_bytes(b"\0" * (ckpts / "step_6" / ".metadata").stat().st_size)
    refresh_manifest(ckpts / "step_6")
    marker = tmp_path / "MARKER"
    plant_metadata(ckpts / "step_4", marker)

    argv = [sys.executable, "-m", "braid.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides(run_dir, **{"checkpoint.interval": 2, "train.steps": 8})]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out[-3000:]
    warned = [ln for ln in out.splitlines() if ln.startswith("braid: warning")]
    assert len(warned) == 4, warned
    expect = {"step_10": "no COMPLETE marker", "step_8": f"{info.relative_path} does not match its checksum",
              "step_6": ".metadata is unreadable", "step_4": ".metadata would call posix.system"}
    for step, why in expect.items():
        line = next(ln for ln in warned if f"{step}'" in ln)
        assert why in line and ("resuming from step_2" in line or "falling back to step_2" in line), line
    assert "resumed from" in out and "step_2 at iteration 2" in out
    assert not marker.exists()
