"""Plain single-device PyTorch models. No parallelism here: braid.parallel shards built models."""

from typing import Any

__all__ = ["HybridLM", "SeqInfo", "model_stats"]


def __getattr__(name: str) -> Any:
    # Lazy, so that config validation (which reads the registry) does not import torch.
    if name in ("HybridLM", "SeqInfo"):
        from braid.models import hybrid

        return getattr(hybrid, name)
    if name == "model_stats":
        from braid.models.stats import model_stats

        return model_stats
    raise AttributeError(name)
