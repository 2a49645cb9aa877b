"""ZeRO-3 (``parallel.engine=deepspeed``, ``parallel.zero_stage=3``) from a model built on the meta device.

DeepSpeed's own way to avoid a whole model per rank, constructing under ``deepspeed.zero.Init``, runs
every module's ``__init__`` on real memory and partitions as it goes, so a module that initialises
itself in ``__init__`` writes into parameters already partitioned away. braid instead builds on the
meta device as for FSDP2 and hands DeepSpeed one parameter at a time: it is drawn whole (the (seed,
name) draw of :mod:`braid.models.init`, the same values as every other layout), given to DeepSpeed's
partitioner, which keeps this rank's 1/dp of it, and freed before the next. Peak memory while
building: the rank's partitions plus one full parameter.

A ZeRO-3 parameter holds no data of its own (``p.data`` is empty; its shape is ``ds_shape``) and its
partition is ``p.ds_tensor``: the flat parameter, zero-padded to a multiple of the group size, in
equal consecutive pieces by rank in ``p.ds_process_group``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from braid.config import ParallelConfig


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter (its data lives in ``p.ds_tensor``)."""
    return getattr(p, "ds_tensor", None) is not None


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also for a ZeRO-3 one (whose own data is empty)."""
    return p.ds_shape if is_partitioned(p) else p.shape


def init_config(p: ParallelConfig, bf16: bool) -> dict:
    """What ``deepspeed.zero.Init`` reads of the run's DeepSpeed config: stage, parameter offload, dtype."""
    from braid.parallel.deepspeed_engine import zero_section

    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero_section(p), "bf16": {"enabled": bf16}}


@torch.no_grad()
def fill_partition(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's piece of ``full`` (the whole value of ZeRO-3 parameter ``p``) into its partition."""
    if tuple(full.shape) != tuple(p.ds_shape):
        raise ValueError(f"ZeRO-3 parameter of shape {tuple(p.ds_shape)}, value of shape {tuple(full.shape)}")
    part = p.ds_tensor
    n = part.ds_numel
    start = n * dist.get_rank(group=p.ds_process_group)
    piece = full.reshape(-1)[start:start + n]
    part.data[:piece.numel()].copy_(piece)
    part.data[piece.numel():].zero_()  # the padding of the last ranks


class _One(nn.Module):
    """A module holding one parameter: what ``deepspeed.zero.Init(module=...)`` takes."""

    def __init__(self, p: nn.Parameter):
        super().__init__()
        self.p = p


@torch.no_grad()
def partition_from_meta(model: nn.Module, template: nn.Module, device: torch.device, seed: int,
                        p: ParallelConfig, dtype: Optional[torch.dtype]) -> nn.Module:
    """Give ``model`` (built on the meta device, not sharded) its ZeRO-3 partitions of the initial weights
    and its buffers on ``device``. ``template``: the same model, left on the meta device, that the init
    rules run on. ``dtype``: the stored dtype (bf16 when DeepSpeed's bf16 is on, which requires it)."""
    from braid.models.init import draw_buffers, draw_parameter
    from braid.parallel.deepspeed_engine import check_flattenable, import_deepspeed
    from braid.parallel.materialize import plain_name

    check_flattenable(model)
    deepspeed = import_deepspeed()
    dtype = dtype or torch.float32
    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # a meta parameter's places (tied ones: several)
    for module in model.modules():
        for attr, q in module._parameters.items():
            if q is not None:
                holders.setdefault(id(q), []).append((module, attr))
    first = None
    for name, meta in list(model.named_parameters()):
        # fp32 draws, then the stored dtype: the values a fp32-built model cast by DeepSpeed would hold.
        value = draw_parameter(template, plain_name(name), device, seed, torch.float32).to(dtype)
        param = nn.Parameter(value, requires_grad=meta.requires_grad)  # a meta tensor cannot take real data
        for tag, v in vars(meta).items():  # the init rules' marks (_no_weight_decay, ...)
            setattr(param, tag, v)
        for module, attr in holders[id(meta)]:
            module._parameters[attr] = param
        del value
        if first is None:  # sets up the partitioner; every later parameter joins through the first one
            deepspeed.zero.Init(module=_One(param), config_dict_or_path=init_config(p, dtype == torch.bfloat16),
                                dtype=dtype)
            first = param
        else:
            first.convert_to_zero_parameters(param_list=[param])
    buffers = draw_buffers(template, device)
    for module_name, module in model.named_modules():
        for n, b in list(module._buffers.items()):
            if b is not None:
                key = plain_name(f"{module_name}.{n}" if module_name else n)
                module._buffers[n] = buffers[key] if key in buffers else torch.empty(b.shape, dtype=b.dtype,
                                                                                      device=device)
    return model


__all__ = ["is_partitioned", "full_shape", "fill_partition", "partition_from_meta", "init_config"]
