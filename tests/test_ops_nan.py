"""Non-finite steps are skipped and counted, N in a row stop the run cleanly; loss spikes are reported
with the batch's sample indices."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from braid.config import load_config
from braid.inspect import summarize
from braid.trainer.checkpoint_layout import complete_checkpoints
from braid.trainer.trainer import NonFiniteLossError, Trainer
from conftest import ROOT, tiny_overrides


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trainer(run_dir: Path, **extra) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(run_dir, **extra)))


def test_poisoned_steps_are_skipped_counted_and_training_goes_on(tmp_path, capsys):
    run_dir = tmp_path / "r"
    # Two in a row (4, 5) stay under the limit of 3: the streak resets at the good step 6.
    t = trainer(run_dir, **{"train.steps": 8, "train.debug_nan_steps": "[2,4,5]", "train.max_nan_iterations": 3,
                            "checkpoint.interval": 5})
    params_before_4 = None

    def snapshot_before(step: int) -> None:
        nonlocal params_before_4
        if t.step == step:
            params_before_4 = [p.detach().clone() for p in t.model.parameters()]

    step = t.train_step

    def spying_step():
        snapshot_before(3)
        loss = step()
        if t.step == 5:  # two skipped updates: the weights are still those after step 3
            assert all(p.equal(q) for p, q in zip(t.model.parameters(), params_before_4))
        return loss

    t.train_step = spying_step
    losses = t.train()
    assert len(losses) == 8 and t.step == 8
    assert [i + 1 for i, x in enumerate(losses) if not math.isfinite(x)] == [2, 4, 5]
    train = [r for r in records(run_dir) if "loss" in r]
    assert [(r["skipped_iterations"], r["nan_iterations"]) for r in train] == \
        [(0, 0), (1, 1), (1, 1), (2, 2), (3, 3), (3, 3), (3, 3), (3, 3)]
    assert train[1]["grad_norm"] is None and train[2]["grad_norm"] is not None
    assert losses[-1] < losses[0]  # it kept learning
    # The checkpoint due at iteration 5 (a poisoned step) was not written; the final one was.
    assert [s for s, _ in complete_checkpoints(run_dir / "checkpoints")] == [8]
    assert "not saving a checkpoint at iteration 5" in capsys.readouterr().out
    assert summarize(run_dir)["skipped_iterations"] == 3


def test_consecutive_non_finite_steps_stop_the_run_with_its_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    t = trainer(run_dir, **{"train.steps": 12, "train.debug_nan_steps": "[5,6,7,8]",
                            "train.max_nan_iterations": 3, "checkpoint.interval": 2})
    with pytest.raises(NonFiniteLossError) as err:
        t.train()
    message = str(err.value)
    assert "\n" not in message and "train.max_nan_iterations=3" in message and "iteration 7" in message
    ckpts = run_dir / "checkpoints"
    assert message.endswith(str(ckpts / "step_4"))
    assert t.step == 7 and [s for s, _ in complete_checkpoints(ckpts)] == [2, 4]  # no step_6
    # The last good checkpoint resumes (the poison hook is off now) and the run finishes.
    resumed = trainer(run_dir, **{"train.steps": 6, "checkpoint.interval": 2})
    assert all(math.isfinite(x) for x in resumed.train()) and resumed.step == 6


def test_cli_exits_3_with_one_line_on_a_non_finite_streak(tmp_path):
    argv = [sys.executable, "-m", "braid.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides(tmp_path / "r", **{"train.steps": 4, "train.debug_nan_steps": "[2,3]",
                                               "train.max_nan_iterations": 2})]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == NonFiniteLossError.exit_code == 3, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "consecutive non-finite iterations" in proc.stderr


def test_max_nan_iterations_zero_never_stops(tmp_path):
    t = trainer(tmp_path / "r", **{"train.steps": 4, "train.debug_nan_steps": "[1,2,3,4]",
                                   "train.max_nan_iterations": 0})
    assert len(t.train()) == 4 and t.skipped_iterations == 4


class SpikingTrainer(Trainer):
    """Multiplies the loss of one iteration (a bad batch as the detector sees it)."""

    spike_at = 10

    def _forward_loss_sum(self, model, batch):
        loss_sum, tokens = super()._forward_loss_sum(model, batch)
        return (loss_sum * 8 if self.step + 1 == self.spike_at else loss_sum), tokens


def test_loss_spike_is_reported_with_the_batch_sample_indices(tmp_path, capsys):
    run_dir = tmp_path / "r"
    t = SpikingTrainer(load_config(None, tiny_overrides(run_dir, **{
        "train.steps": 12, "train.loss_spike_window": 5, "train.loss_spike_zscore": 4.0})))
    t.train()
    spikes = [r for r in records(run_dir) if "spike_loss" in r]
    assert [r["step"] for r in spikes] == [10]  # and no false alarm before or after
    spike = spikes[0]
    assert spike["global_samples"] == [36, 40]  # iteration 10 of a 4-sample global batch
    assert spike["dataset_indices"] == [t.order(g) for g in range(36, 40)]
    assert spike["zscore"] > 4.0
    logged = next(r for r in records(run_dir) if r.get("step") == 10 and "loss" in r)
    assert spike["spike_loss"] == logged["loss"]
    warning = [ln for ln in capsys.readouterr().out.splitlines() if "loss spike" in ln]
    assert len(warning) == 1 and "iteration 10" in warning[0] and "global samples 36..39" in warning[0]
    assert all(str(i) in warning[0] for i in spike["dataset_indices"])
    assert [s["step"] for s in summarize(run_dir)["loss_spikes"]] == [10]
