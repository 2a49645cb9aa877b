"""nGPT's weight normalisation after each optimizer step, on plain or sharded (FSDP2 / TP DTensor)
parameters.

A norm along ``dim`` needs every element of each row / column along it. When no placement of the
parameter shards ``dim`` (FSDP2's Shard(0) and a norm over dim 1: the embedding, the head, the input
projections), each rank holds whole rows and normalises its own shard in place, without
communication. Otherwise (the output projections' columns over dim 0 under FSDP2) the matrix is
gathered, normalised, and each rank keeps its slice.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from braid.models.ngpt import normalized_params, sphere
from braid.trainer.muon import set_full


@torch.no_grad()
def normalize_sharded_(p: torch.Tensor, dim: int) -> None:
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        p.copy_(sphere(p, dim))
        return
    dim = dim % p.ndim
    if not any(pl.is_shard() and pl.dim == dim for pl in p.placements):
        local = p.to_local()
        local.copy_(sphere(local, dim))
        return
    set_full(p, sphere(p.full_tensor(), dim))


def normalize_weights(model: nn.Module) -> None:
    """Every matrix of ``braid.models.ngpt.normalized_params`` back to unit norm along its embedding dim."""
    for _, p, dim in normalized_params(model):
        normalize_sharded_(p, dim)
