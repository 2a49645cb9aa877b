"""The loss's health between steps: a spike against the recent losses is a warning naming the batch's
samples (to look at the data); a streak of non-finite iterations stops the run."""

from __future__ import annotations

from pathlib import Path

from braid.config import TrainConfig
from braid.data.loader import SampleOrder
from braid.errors import NonFiniteLossError
from braid.trainer.checkpoint import latest_checkpoint
from braid.trainer.metrics import LossSpikeDetector, MetricsLogger


class LossHealth:
    def __init__(self, t: TrainConfig):
        self.spikes = LossSpikeDetector(t.loss_spike_window, t.loss_spike_zscore) if t.loss_spike_window else None
        self.max_nan_iterations = t.max_nan_iterations
        self.nan_streak = 0  # consecutive non-finite steps; never checkpointed: no save happens during one

    def count(self, finite: bool) -> None:
        self.nan_streak = 0 if finite else self.nan_streak + 1

    def check_spike(self, step: int, loss: float, samples: range, order: SampleOrder, logger: MetricsLogger) -> None:
        """``samples``: the global sample ids of iteration ``step``'s batch."""
        spike = self.spikes.check(loss) if self.spikes is not None else None
        if spike is not None:
            record = {"step": step, "spike_loss": loss, **spike, "global_samples": [samples.start, samples.stop],
                      "dataset_indices": [order(g) for g in samples]}
            logger.console(self.spikes.warning(record))
            logger.write(record)

    def check_nan_streak(self, step: int, checkpoints: Path) -> None:
        limit = self.max_nan_iterations
        if limit and self.nan_streak >= limit:
            good = latest_checkpoint(checkpoints)
            raise NonFiniteLossError(
                f"{self.nan_streak} consecutive non-finite iterations (loss or gradients) up to iteration {step} "
                f"(train.max_nan_iterations={limit}); stopped, last good checkpoint: {good or 'none saved yet'}")
