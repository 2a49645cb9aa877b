"""What the trainer needs to know about a wrapped model, whatever the data-parallel engine.

FSDP2 (:mod:`braid.parallel.fsdp`) shards the model in place, so the model is its own module;
a DeepSpeed engine holds it as ``.module``. DDP is no longer used: FSDP2 on a
``(dp_replicate, dp_shard=1)`` mesh is the replicate-only layout (see ``fsdp.py``).
"""

from __future__ import annotations

import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """The HybridLM inside an engine (DeepSpeed) or the model itself (plain, FSDP2)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


__all__ = ["unwrap"]
