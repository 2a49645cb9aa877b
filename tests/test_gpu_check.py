"""bench/gpu_check.sh parses and runs its stage logic here: ``--dry-run`` runs the environment stage,
writes every CUDA stage's JSON as skipped, stays within the device tool's 8 files, and its stage
timeouts (with their kill grace) add up to at most 420 s."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": os.sys.executable}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    stages = ["env", "kernels_attention", "kernels_linear", "tests", "train", "speed_attention", "speed_train"]
    assert files == sorted([f"{s}.json" for s in stages] + ["log.txt"])
    data = {s: json.loads((out / f"{s}.json").read_text()) for s in stages}
    assert data["env"]["rc"] == 0 and data["env"]["python"] and data["env"]["torch"], data["env"]
    assert all("dry run" in data[s]["skipped"] for s in stages[1:])
    assert sum(d["timeout_s"] + 3 for d in data.values()) <= 420
    assert "bench/train_curves.py --device cuda --precision bf16" in data["train"]["command"]
