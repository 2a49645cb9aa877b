"""What a run reports about itself: the banner that opens its console log, and the Megatron-style record
of every ``logging.interval`` iterations (console line and ``metrics.jsonl``)."""

from __future__ import annotations

from collections.abc import Sized
from typing import Optional

from braid.config import Config, ModelConfig
from braid.data.loader import UNBOUNDED
from braid.models.stats import ModelStats
from braid.parallel.distributed import DistInfo
from braid.parallel.mesh import ParallelDims, mesh_summary
from braid.trainer.metrics import MetricsLogger, StepTimer, memory_gib, peak_flops


def _sequences(data: Sized) -> str:
    # A stream's length is a sentinel, not a count: printing it would claim 2^63 sequences.
    return "stream" if len(data) == UNBOUNDED else str(len(data))


def banner(cfg: Config, info: DistInfo, model_cfg: ModelConfig, stats: ModelStats, train_data: Sized,
           valid_data: Sized, grad_accum: int, dims: ParallelDims) -> str:
    p = cfg.parallel
    return (
        f"braid: run dir {cfg.run_dir} | {info.world_size} rank(s) on {info.nodes} node(s), {info.device.type} | "
        f"pattern {model_cfg.pattern} | params {stats.params / 1e6:.2f}M "
        f"({stats.non_embedding_params / 1e6:.2f}M non-embedding) | {stats.flops_per_token / 1e6:.1f} MFLOP/token | "
        f"train {_sequences(train_data)} / valid {_sequences(valid_data)} sequences of {cfg.data.seq_len} | "
        f"grad accumulation {grad_accum} | {mesh_summary(dims)}, engine {p.engine}"
        + (f" ZeRO-{p.zero_stage}" if p.engine == "deepspeed" else "")
        + f", activation checkpoint {p.activation_checkpoint}"
    )


class IntervalLog:
    """Losses and step times summed over the iterations since the last logged one, and the record
    that averages them. The sums are checkpointed, so a resumed run logs what an uninterrupted one would."""

    def __init__(self, cfg: Config, stats: ModelStats, info: DistInfo, timer: StepTimer):
        self.cfg, self.stats, self.info, self.timer = cfg, stats, info, timer
        self.peak = peak_flops(info.device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.time = 0.0, 0, 0.0

    def state(self) -> dict:
        return {"window_loss_sum": self.loss_sum, "window_steps": self.steps, "window_time": self.time}

    def load_state(self, state: dict) -> None:
        self.loss_sum, self.steps = float(state["window_loss_sum"]), int(state["window_steps"])
        self.time = float(state["window_time"])

    def add(self, step: int, loss: float, seconds: float) -> bool:
        """Count iteration ``step``; whether it is one to log."""
        self.loss_sum += loss
        self.steps += 1
        self.time += seconds
        return step % self.cfg.logging.interval == 0 or step == self.cfg.train.steps

    def flush(self, logger: MetricsLogger, step: int, lr: float, grad_norm: Optional[float], consumed_samples: int,
              consumed_tokens: int, skipped_iterations: int, nan_iterations: int, extra: dict) -> None:
        """Log the averages at iteration ``step`` (``extra`` appended to the record), then start over."""
        t, device = self.cfg.train, self.info.device
        step_time = self.time / self.steps
        tokens_per_s = t.global_batch_size * self.cfg.data.seq_len / step_time
        tflops = self.stats.flops_per_token * tokens_per_s / self.info.world_size / 1e12
        mem, mem_kind = memory_gib(device)
        record = {
            "step": step,
            "loss": self.loss_sum / self.steps,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "consumed_samples": consumed_samples,
            "consumed_tokens": consumed_tokens,
            "global_batch_size": t.global_batch_size,
            "step_time_s": step_time,
            "tflops": tflops if device.type == "cuda" else None,
            "mfu": tflops * 1e12 / self.peak if self.peak else None,
            "skipped_iterations": skipped_iterations,
            "nan_iterations": nan_iterations,
            "memory_gib": mem,
            **self.timer.averages(),
            **extra,
        }
        logger.console(logger.train_line(record, t.steps, mem_kind))
        logger.write(record)
        self.reset()
