"""Plain data parallelism (DDP). FSDP2 / ZeRO replace this in the parallelism work."""

from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from braid.parallel.distributed import DistInfo


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap in DDP when there is more than one rank; gradients are averaged over ranks."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # No buffer needs rank 0's copy: MoE load counts are per rank until summed, expert biases are
    # updated identically everywhere from the summed counts.
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def grad_average_factor(model: nn.Module, info: DistInfo) -> float:
    """DDP averages gradients over ranks; a loss normalised by the global token count needs ×world."""
    return float(info.world_size) if isinstance(model, DistributedDataParallel) else 1.0


__all__ = ["apply_ddp", "unwrap", "no_sync", "grad_average_factor"]
