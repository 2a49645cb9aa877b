"""The meta-device lifecycle's last step: give a parallelised model built on the meta device its memory
and this rank's part of the initial weights (torchtitan's order: build on meta → parallelize →
``to_empty`` → initialise the local shards).

Each parameter's full value comes from :func:`braid.models.init.draw_parameter` (keyed by seed and
name, so the same under every layout), one parameter at a time; the rank keeps its local shard of it
(``distribute_tensor(..., src_data_rank=None)`` slices locally, for every placement FSDP2, TP and EP
use) and frees the rest. Peak memory while building: the rank's own shard plus one full parameter.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter's name in the plain model (without AC / compile wrapper prefixes)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` laid out as ``like`` (a DTensor parameter, or a plain one: all of it)."""
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full


@torch.no_grad()
def fill_local(model: nn.Module, full_value: Callable[[str, torch.Tensor], Optional[torch.Tensor]]) -> None:
    """Copy, parameter by parameter, this rank's part of ``full_value(plain name, parameter)`` into
    ``model``'s local shards (``None``: leave that parameter as it is). One full tensor lives at a time."""
    from braid.parallel.zero3 import fill_partition, is_partitioned

    for name, p in model.named_parameters():
        full = full_value(plain_name(name), p)
        if full is None:
            continue
        if is_partitioned(p):  # ZeRO-3: the rank's piece of the flat parameter
            fill_partition(p, full.to(device=p.ds_tensor.device, dtype=p.ds_tensor.dtype))
            del full
            continue
        local = p.to_local() if isinstance(p, DTensor) else p.data
        part = local_part(full.to(device=local.device, dtype=local.dtype), p)
        if part.shape != local.shape:
            raise ValueError(f"parameter {name}: local shard {tuple(local.shape)}, drawn {tuple(part.shape)}")
        local.copy_(part)
        del full, part


@torch.no_grad()
def materialize(model: nn.Module, template: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate ``model`` (parallelised, on the meta device) on ``device`` and initialise its shards.

    ``template``: the same HybridLM, unparallelised, still on the meta device (never allocated)."""
    from braid.models.init import draw_buffers, draw_parameter

    model.to_empty(device=device)
    fill_local(model, lambda name, p: draw_parameter(template, name, device, seed, p.dtype))
    buffers = draw_buffers(template, device)
    for name, b in model.named_buffers():
        value = buffers.get(plain_name(name))
        if value is not None and value.shape == b.shape:
            b.copy_(value)
        elif value is not None:  # a buffer a parallelism keeps per rank in another shape
            raise ValueError(f"buffer {name}: shape {tuple(b.shape)} here, {tuple(value.shape)} when built")
    return model


__all__ = ["materialize", "fill_local", "local_part", "plain_name"]
