"""End-to-end training: loss falls, exact resume, checkpoint safety, run-dir layout, wandb, signals."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from braid.config import load_config
from braid.errors import CheckpointError
from braid.trainer.checkpoint import MARKER, latest_checkpoint
from braid.trainer.trainer import Trainer
from conftest import ROOT, tiny_overrides

TRAIN_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_tokens", "consumed_samples",
              "skipped_iterations", "nan_iterations", "tflops", "mfu", "memory_gib", "step_time_s"}


def run(run_dir: Path, **extra) -> tuple[Trainer, list[float]]:
    trainer = Trainer(load_config(None, tiny_overrides(run_dir, **extra)))
    return trainer, trainer.train()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_thirty_steps_lower_the_loss(tmp_path):
    _, losses = run(tmp_path / "r", **{"train.steps": 30, "checkpoint.interval": 30})
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses


def test_run_dir_layout_and_metrics(tmp_path):
    run_dir = tmp_path / "r"
    run(run_dir, **{"train.steps": 10, "checkpoint.interval": 4, "checkpoint.keep": 2})
    assert (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml").train.steps == 10  # the saved config reloads
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_10", "step_8"]  # keep=2
    assert (ckpts / "latest").read_text().strip() == "step_10"
    assert all((ckpts / s / MARKER).is_file() for s in ("step_8", "step_10"))
    records = metrics(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert all(TRAIN_KEYS <= set(r) for r in train)
    assert [r["step"] for r in evals] == [5, 10]
    assert train[-1]["consumed_samples"] == 40 and train[-1]["consumed_tokens"] == 40 * 32
    assert train[-1]["tflops"] is None and train[-1]["mfu"] is None  # n/a on CPU


def test_resume_gives_bit_identical_losses(tmp_path):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    _, full = run(full_dir, **{"train.steps": 12, "checkpoint.interval": 6, "logging.interval": 4})
    # A run killed after step 6 leaves exactly this on disk.
    shutil.copytree(full_dir / "checkpoints" / "step_6", resumed_dir / "checkpoints" / "step_6")
    trainer, rest = run(resumed_dir, **{"train.steps": 12, "checkpoint.interval": 6, "logging.interval": 4})
    assert trainer.consumed_samples == 48
    assert rest == full[6:]  # exact equality, not approximate
    # The interval-averaged log line spanning the resume is identical too.
    full_logged = {r["step"]: r["loss"] for r in metrics(full_dir) if "loss" in r}
    resumed_logged = {r["step"]: r["loss"] for r in metrics(resumed_dir) if "loss" in r}
    assert resumed_logged[8] == full_logged[8] and resumed_logged[12] == full_logged[12]


def test_resume_auto_never_picks_an_incomplete_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    run(run_dir, **{"train.steps": 4, "checkpoint.interval": 2})
    ckpts = run_dir / "checkpoints"
    # A newer checkpoint without its marker (killed mid-save) and a leftover temporary directory.
    shutil.copytree(ckpts / "step_4", ckpts / "step_9")
    (ckpts / "step_9" / MARKER).unlink()
    shutil.copytree(ckpts / "step_4", ckpts / ".step_11.tmp")
    assert latest_checkpoint(ckpts) == ckpts / "step_4"
    trainer, losses = run(run_dir, **{"train.steps": 6, "checkpoint.interval": 2})
    assert len(losses) == 2 and trainer.step == 6
    with pytest.raises(CheckpointError, match="step_9"):
        run(tmp_path / "other", **{"checkpoint.resume": ckpts / "step_9"})


def test_explicit_resume_path_and_resume_none(tmp_path):
    src = tmp_path / "src"
    run(src, **{"train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 5})
    trainer, losses = run(tmp_path / "b", **{"train.steps": 6, "checkpoint.resume": src / "checkpoints" / "step_2"})
    assert len(losses) == 4 and trainer.consumed_samples == 24
    trainer, losses = run(src, **{"train.steps": 4, "checkpoint.resume": "none"})
    assert len(losses) == 4


def test_finished_run_resumes_to_nothing(tmp_path):
    run(tmp_path / "r", **{"train.steps": 3})
    _, losses = run(tmp_path / "r", **{"train.steps": 3})
    assert losses == []


def test_wandb_offline_writes_a_run_and_resume_continues_it(tmp_path):
    pytest.importorskip("wandb")  # optional (the GPU image has none)
    run_dir = tmp_path / "r"
    run(run_dir, **{"train.steps": 2, "logging.wandb": "offline"})
    run_id = (run_dir / "wandb_id").read_text().strip()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs and all(p.name.endswith(run_id) for p in runs)
    assert any(p.suffix == ".wandb" for r in runs for p in r.iterdir())
    run(run_dir, **{"train.steps": 4, "logging.wandb": "offline"})
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (run_dir / "wandb").glob("offline-run-*"))


def _cli(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "braid.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides(run_dir), *extra]


def test_torchrun_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *_cli(one, "train.steps=6")], check=True, cwd=ROOT,
                   capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *_cli(two, "train.steps=6", "parallel.dp=2")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [r for r in metrics(one) if "loss" in r]
    b = [r for r in metrics(two) if "loss" in r]
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    ea = [r["eval_loss"] for r in metrics(one) if "eval_loss" in r]
    eb = [r["eval_loss"] for r in metrics(two) if "eval_loss" in r]
    assert eb == pytest.approx(ea, rel=1e-5)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, *_cli(run_dir, "train.steps=100000", "checkpoint.interval=100000")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "iteration" in line and "consumed samples" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
    assert "stopping at iteration" in out and "SIGTERM" in out
    saved = latest_checkpoint(run_dir / "checkpoints")
    assert saved is not None
    step = int(saved.name.split("_")[1])
    trainer, losses = run(run_dir, **{"train.steps": step + 2, "checkpoint.interval": 100000})
    assert trainer.step == step + 2 and len(losses) == 2


def test_end_to_end_cli_prints_megatron_log_line(tmp_path):
    proc = subprocess.run([sys.executable, *_cli(tmp_path / "r", "train.steps=2")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "iteration" in ln and "lm loss" in ln)
    for field in ("consumed tokens", "learning rate", "grad norm", "skipped iterations", "nan iterations",
                  "tokens/s", "TFLOP/s/GPU: n/a", "MFU: n/a", "mem"):
        assert field in line
