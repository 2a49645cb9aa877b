"""Tensor parallelism for MoE layers: every expert's SwiGLU hidden units split over tp.

Layout (Megatron's, per expert): ``gate_up [E, d, 2h]`` column-parallel (``Shard(2)``), ``down
[E, h, d]`` row-parallel (``Shard(1)``), the shared experts as a sharded SwiGLU. ``gate_up`` packs
``[gate | up]``, so a plain ``Shard(2)`` gives rank 0 gates and rank 1 ups (tp 2): its output goes
through one all-to-all (:class:`comm.PackedColumns`) that hands each rank the gate *and* up columns
of its own hidden units.

Routing is replicated: the router and ``expert_bias`` stay plain (every tp rank routes the same
tokens to the same experts, counts the same load and computes the same auxiliary loss, so their
gradients are already complete on each rank and are not reduced over tp). The experts and the shared
experts produce partial sums of the output; they are added and reduced once (all-reduce, or
reduce-scatter with sequence parallelism). Gradients that come out partial are all-reduced in
backward: the experts' input (one ``copy_to_region`` on the layer input) and the routing weights (they
multiply partial expert outputs).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from braid.errors import ConfigError
from braid.kernels.grouped_gemm import grouped_mm
from braid.parallel import collectives as comm


def local_expert_ffn(module: nn.Module, xs: torch.Tensor, sizes: torch.Tensor, w1: torch.Tensor,
                     w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU of expert-sorted rows ``xs [P, d]`` with local expert weights (tp shards re-laid out);
    shared by the tp-only path and expert parallelism (``expert_parallel.py``)."""
    h = grouped_mm(xs, w1.to(xs.dtype), sizes)
    relayout = getattr(module, "_tp_gate_up", None)
    if relayout is not None:  # tp: contiguous columns of [gate | up] → this rank's gate and up units
        h = relayout(h)
    gate, up = h.chunk(2, dim=-1)
    return grouped_mm(F.silu(gate) * up, w2.to(xs.dtype), sizes)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def shard_moe(moe: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard one :class:`~braid.models.moe.MoE` over the 1-D ``tp_mesh`` in place (see module doc)."""
    from braid.models.tp_plan import set_reset_view
    from braid.parallel.tensor_parallel import _global_view, shard_module
    from braid.parallel.tp_plans.mixers import module_plan

    group, p = tp_mesh.get_group(), tp_mesh.size()
    if moe.hidden % p:
        raise ConfigError(f"config key 'model.moe.expert_hidden' = {moe.hidden} must be divisible by "
                          f"parallel.tp = {p}")
    if moe.shared is not None and moe.shared.gate_proj.out_features % p:
        raise ConfigError(f"config key 'model.moe.shared_hidden' = {moe.shared.gate_proj.out_features} must "
                          f"be divisible by parallel.tp = {p}")
    for name, dim in (("gate_up", 2), ("down", 1)):
        old = getattr(moe, name)
        new = nn.Parameter(distribute_tensor(old.data, tp_mesh, [Shard(dim)]), requires_grad=old.requires_grad)
        new.__dict__.update(old.__dict__)
        moe.register_parameter(name, new)
    if moe.shared is not None:  # its partial output joins the experts' before the one reduction
        shard_module(moe.shared, tp_mesh, module_plan(moe.shared, p), lambda x: x, lambda y: y)
    # Re-initialisation (meta-device builds) draws on the global view, as unsharded.
    set_reset_view(moe, _global_view)
    moe._tp_gate_up = comm.PackedColumns.blocks([moe.hidden, moe.hidden], group)
    moe._tp_router_input = None

    def experts(self, xs: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        return local_expert_ffn(self, xs, group_sizes, _local(self.gate_up), _local(self.down))

    route = moe.route

    def route_tp(x2: torch.Tensor):
        # The router sees the layer input before copy_to_tp: its gradient is complete on each rank.
        idx, weights, scores, logits = route(moe._tp_router_input)
        return idx, comm.copy_to_region(weights, group), scores, logits

    moe.experts = types.MethodType(experts, moe)
    moe.route = route_tp
    inner = moe.forward
    if sequence_parallel:  # every rank routes the whole sequence and keeps its chunk of the sum
        enter = lambda x: comm.gather_from_sequence(x, group, tensor_parallel_output_grad=False)  # noqa: E731
        leave = lambda y: comm.reduce_scatter_to_sequence(y, group)  # noqa: E731
    else:
        enter, leave = (lambda x: x), (lambda y: comm.reduce_from_region(y, group))

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = enter(x)
        moe._tp_router_input = x.reshape(-1, x.shape[-1])
        try:
            y = inner(comm.copy_to_region(x, group))
        finally:
            moe._tp_router_input = None
        return leave(y)

    moe.forward = forward


__all__ = ["shard_moe", "local_expert_ffn"]
