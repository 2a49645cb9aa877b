"""Crash safety: SIGKILL at random moments (mid-save included), resume=auto each time, and the losses
are those of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from braid.config import load_config
from braid.trainer.checkpoint_layout import MARKER
from braid.trainer.trainer import Trainer
from conftest import ROOT, tiny_overrides

# A save at every step keeps saves frequent enough to be hit; eval every 4 steps puts eval records
# between the step lines that must survive the kills too.
SETTINGS = {"checkpoint.interval": 1, "checkpoint.keep": 2, "train.eval_interval": 4}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def outcome(run_dir: Path) -> list[tuple]:
    """What must be identical: per-step loss and grad norm, and every evaluation."""
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss")) for r in records(run_dir)]


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return max(steps)


def _tmp_dirs(ckpts: Path, from_step: int = 0) -> set[int]:
    """Inodes of the half-written checkpoints of steps >= ``from_step`` (a name may come back after a
    resume, an inode does not while the old one is still there)."""
    try:
        names = os.listdir(ckpts)
    except FileNotFoundError:
        return set()
    found = set()
    for n in names:
        if n.startswith(".step_") and n.endswith(".tmp") and int(n[6:-4]) >= from_step:
            try:
                found.add(os.stat(ckpts / n).st_ino)
            except FileNotFoundError:  # renamed into place meanwhile
                pass
    return found


def _kill_at(run_dir: Path, steps: int, step: int, mid_save: bool, delay: float) -> tuple[bool, bool]:
    """Start the run; SIGKILL it once step ``step`` is logged (then after ``delay`` s), or, with
    ``mid_save``, while the checkpoint of a step >= ``step`` is being written. Returns whether it was
    killed before finishing, and whether the kill left a half-written checkpoint."""
    argv = [sys.executable, "-m", "braid.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides(run_dir, **{**SETTINGS, "train.steps": steps})]
    ckpts, deadline = run_dir / "checkpoints", time.monotonic() + 120
    stale = _tmp_dirs(ckpts)  # left by an earlier kill: not this run's save
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and time.monotonic() < deadline:
        if mid_save and _tmp_dirs(ckpts, step) - stale:
            break
        if not mid_save and _last_step(run_dir) >= step:
            time.sleep(delay)
            break
        if not mid_save:
            time.sleep(0.002)  # the mid-save poll spins: a save of this model lasts milliseconds
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    err = proc.communicate(timeout=60)[1].decode()
    assert killed or proc.returncode == 0, err[-3000:]
    return killed, bool(_tmp_dirs(ckpts) - stale)


def train_with_kills(run_dir: Path, steps: int, kills: int, seed: int) -> int:
    """Kill the run ``kills`` times at seeded random steps (the first while saving), then let it finish.

    Returns how many kills left a half-written checkpoint behind.
    """
    rng = random.Random(seed)
    at = sorted(rng.sample(range(2, steps - 2), kills))
    mid_saves = 0
    for i, step in enumerate(at):
        want_mid_save = i == 0 or mid_saves == 0 or rng.random() < 0.5
        mid_saves += _kill_at(run_dir, steps, step, want_mid_save, rng.uniform(0.0, 0.15))[1]
        # Whatever the kill left, every visible step_<N> is whole.
        for p in (run_dir / "checkpoints").glob("step_*"):
            assert (p / MARKER).is_file(), f"{p} visible without its marker"
    for _ in range(3):  # a kill meant for mid-save can land just after the rename: try once more
        if mid_saves or _last_step(run_dir) >= steps - 1:
            break
        mid_saves += _kill_at(run_dir, steps, _last_step(run_dir) + 1, True, 0.0)[1]
    assert not _kill_at(run_dir, steps, steps + 1, False, 0.0)[0]  # runs to the end
    return mid_saves


def _check(tmp_path: Path, steps: int, kills: int, seed: int) -> None:
    reference = tmp_path / "reference"
    Trainer(load_config(None, tiny_overrides(reference, **{**SETTINGS, "train.steps": steps}))).train()
    killed = tmp_path / "killed"
    assert train_with_kills(killed, steps, kills, seed) >= 1, "no kill landed mid-save"
    assert [r["step"] for r in records(killed) if "loss" in r] == list(range(1, steps + 1))
    assert outcome(killed) == outcome(reference)  # exact: floats compared bit for bit


def test_kill_mid_save_and_resume_is_bit_identical(tmp_path):
    _check(tmp_path, steps=8, kills=1, seed=0)


@pytest.mark.slow
def test_five_random_kills_and_resumes_are_bit_identical(tmp_path):
    _check(tmp_path, steps=20, kills=5, seed=9)
