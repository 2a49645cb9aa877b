"""The README's promise about the default run (`make train`): configs/tiny.yaml, unchanged, trains the
default model on the embedded corpus with the logged loss falling from ~4.5
(iteration 10, the first line) to ~1.9 (iteration 200).

Run as a user runs it (a fresh ``python -m braid.train --config configs/tiny.yaml``, only the run dir
moved), and read from the run's own metrics.jsonl. Its wall time (3-4 minutes on 2 cores) is printed by
``pytest --durations``, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_default_run_loss_falls_as_the_readme_says(tmp_path):
    run_dir = tmp_path / "tiny"
    proc = subprocess.run([sys.executable, "-m", "braid.train", "--config", "configs/tiny.yaml",
                           f"run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert max(r.get("step", 0) for r in rows) == 200
    # README: "from ~4.5 at iteration 10 to ~1.9 at iteration 200" (first and last logged lines).
    assert losses[0] == pytest.approx(4.5, abs=0.3), losses[:3]
    assert losses[-1] == pytest.approx(1.9, abs=0.2), losses[-3:]
    assert evals and evals[-1] < 2.2, evals
    assert (run_dir / "checkpoints" / "latest").exists()
