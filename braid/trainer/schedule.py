"""Learning-rate schedules as pure functions of the step (so the schedule state is the step)."""

from __future__ import annotations

import math

from braid.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for the optimizer step that follows ``step`` completed steps (0-based).

    - warmup: linear from lr/warmup to lr over ``warmup_steps``;
    - ``cosine``: cosine from lr to ``min_lr_ratio·lr`` at ``steps``;
    - ``wsd`` (warmup-stable-decay): constant, then linear to the minimum over the final
      ``decay_fraction`` of the steps;
    - ``constant``: lr after warmup.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = round(cfg.decay_fraction * cfg.steps)
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start or decay_steps == 0:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, cfg.steps - decay_start))
        return peak + (floor - peak) * progress
    raise ValueError(f"unknown train.schedule {cfg.schedule!r}")
