"""Process-group setup from the torchrun environment (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from braid.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # Launcher agents (torchrun: one per node), for the log; 1 for a single process.
    nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():  # bad input for this machine: one line before anything is written
            raise ConfigError("config key 'train.device' = 'cuda' is invalid here: no CUDA device is available "
                              "(train.device=auto uses one when present, else the CPU)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_spec: str = "auto", single_process_group: bool = False) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/...); a single process needs none,
    unless ``single_process_group`` (DeepSpeed needs a process group even for one rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    elif single_process_group and not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    # torchrun numbers its agents (one per node) in GROUP_RANK / GROUP_WORLD_SIZE.
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, nodes=nodes)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum ``t`` in place over ``group`` (default: all ranks); a no-op without a process group."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: whether ``flag`` holds on any rank (every rank must call it); ``flag`` itself alone."""
    return all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
