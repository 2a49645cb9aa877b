"""python -m braid.inspect summarises a run directory, including incomplete checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from braid.config import load_config
from braid.inspect import summarize
from braid.trainer.trainer import Trainer
from conftest import ROOT, tiny_overrides


def test_inspect_reports_progress_checkpoints_and_losses(tmp_path):
    run_dir = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides(run_dir, **{"train.steps": 6, "checkpoint.interval": 3}))).train()
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step_6", ckpts / "step_9")
    (ckpts / "step_9" / "COMPLETE").unlink()
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 1.0')  # a line cut by a crash

    s = summarize(run_dir)
    assert s["last_step"] == 6 and s["latest_pointer"] == "step_6"
    assert s["first_loss"] > s["last_loss"]
    assert [(c["step"], c["complete"]) for c in s["checkpoints"]] == [(3, True), (6, True), (9, False)]
    assert s["unreadable_metric_lines"] == 1
    assert s["best_eval_loss"] is not None and "model:" in s["config"]
    # The config shown is the newest sound checkpoint's own, with what the checkpoint says of itself.
    assert s["config_file"] == str(ckpts / "step_6" / "config.yaml")
    assert s["checkpoints"][1]["consumed_tokens"] == 6 * 4 * 32 and s["checkpoints"][1]["braid_version"]

    out = subprocess.run([sys.executable, "-m", "braid.inspect", str(run_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "INCOMPLETE" in out.stdout and "step_6" in out.stdout
    as_json = subprocess.run([sys.executable, "-m", "braid.inspect", str(run_dir), "--json"], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
    assert json.loads(as_json.stdout)["last_step"] == 6


def test_inspect_missing_dir_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "braid.inspect", str(tmp_path / "nope")], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "nope" in out.stderr
