"""Tensor parallelism of one MoE layer on its own (what ``apply_tp`` does for every layer): the
plan is the layer's declaration (``MoE.tp_plan``: every expert's hidden units split over tp, routing
replicated), applied like any other module's."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh


def shard_moe(moe: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard one MoE layer over the 1-D ``tp_mesh`` in place; its input and output are the layer's
    (with ``sequence_parallel``: this rank's time chunk)."""
    from braid.parallel.tensor_parallel import boundary, shard_module
    from braid.parallel.tp_plans.mixers import module_plan

    plan = module_plan(moe, tp_mesh.size())
    shard_module(moe, tp_mesh, plan, *boundary(plan, tp_mesh.get_group(), sequence_parallel))


__all__ = ["shard_moe"]
