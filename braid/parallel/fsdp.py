"""FSDP2 (``fully_shard``) per block + root, HSDP on a 2-D mesh, and a DTensor-aware grad clip.

Every multi-rank data-parallel layout runs FSDP2, as torchtitan does, also a pure-replicate one
(``dp_shard 1``: HSDP with shards of one rank is DDP with FSDP2's hooks). One code path means one
kind of checkpoint (DTensor shards) that DCP reshards between any two layouts.

Gradients are reduce-scattered (fp32) on every micro-batch: skipping the sync would keep unsharded
gradients of the whole model on each rank, which is what sharding is meant to avoid.
FSDP2 averages gradients over its mesh; the trainer's loss is normalised by the global token
count, so it multiplies the objective by :func:`grad_divide_factor` to get a plain sum back.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def expert_sharded_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that expert parallelism sharded over the ``ep`` mesh (DTensors on it, or on
    ``(ep, tp)`` when tensor parallelism also splits each expert's hidden units)."""
    return [p for p in model.parameters()
            if isinstance(p, DTensor) and "ep" in (p.device_mesh.mesh_dim_names or ())]


def scalar_params(model: nn.Module) -> list[nn.Parameter]:
    """0-d parameters (none in braid's models today; a guard for new ones): FSDP2 cannot shard them, so they
    stay replicated and their gradients are all-reduced by :func:`reduce_manual_grads`."""
    return [p for p in model.parameters() if p.ndim == 0 and not isinstance(p, DTensor)]


def apply_fsdp(model: nn.Module, mesh, param_dtype: Optional[torch.dtype],
               ignored: Optional[set] = None) -> nn.Module:
    """Shard every block of ``model.layers`` and then the root (embedding, final norm, head, meta).

    Args:
        model: a :class:`braid.models.hybrid.HybridLM` (possibly with TP/AC applied already).
        mesh: a 1-D DeviceMesh (FSDP) or 2-D ``(dp_replicate, dp_shard_cp)`` (HSDP).
        param_dtype: compute dtype of the unsharded parameters (bf16 on GPU) or None (keep fp32);
            gradients are always reduced in fp32.
        ignored: parameters FSDP2 leaves alone: the ep-sharded experts (their data-parallel
            reduction spans only the ranks outside their ep group) and 0-d parameters; see
            :func:`reduce_manual_grads`.
    Returns the same module object, now an FSDPModule.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    return model


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, group=None) -> float:
    """Clip gradients to a total L2 norm of ``max_norm`` (``inf``: no clipping); returns the norm
    before clipping, as ``torch.nn.utils.clip_grad_norm_`` does. Works for plain tensors and for
    DTensors on several meshes (FSDP, TP, EP): each mesh's norm is reduced over that mesh (the
    DTensor norm knows Shard from Replicate), then the per-mesh norms are combined, and over ``group``
    (pipeline stages: ranks holding different parameters) when given.
    """
    return float(clip_grad_norm_tensor(params, max_norm, group))


def clip_grad_norm_tensor(params: Iterable[torch.Tensor], max_norm: float, norm_group=None) -> torch.Tensor:
    """:func:`clip_grad_norm` without reading the norm back to the host (a 0-d tensor): what
    ``python -m braid.rehearse`` runs, whose fake tensors have no value to read."""
    by_mesh: dict = defaultdict(list)
    for p in params:
        if p.grad is not None:
            by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms and norm_group is None:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0] if norms else None
    if norm_group is not None:
        import torch.distributed as dist

        square = (total.double() ** 2) if total is not None else torch.zeros(
            (), dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(square, group=norm_group)
        total = square.sqrt().to(norms[0].dtype if norms else torch.float32)
    for group in by_mesh.values():  # one foreach scaling per mesh (foreach ops need a common mesh)
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def reduce_manual_grads(params: list[nn.Parameter], replica_group, divide: float) -> None:
    """Data-parallel reduction of the gradients FSDP2 skips (``ignored`` in :func:`apply_fsdp`):
    sum over the ranks holding the same values (``replica_group``; None when there are none, as for
    experts sharded over every data rank, whose all-to-all backward already summed all tokens), then
    divide like FSDP2 does for the other parameters so every gradient carries the same scale."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if replica_group is not None:
            dist.all_reduce(local, group=replica_group)
        local.div_(divide)


def grad_divide_factor(mesh) -> float:
    """How many ranks FSDP2 averages a gradient over (1 without FSDP)."""
    return 1.0 if mesh is None else float(mesh.size())


__all__ = ["apply_fsdp", "expert_sharded_params", "scalar_params", "reduce_manual_grads", "clip_grad_norm",
           "clip_grad_norm_tensor",
           "grad_divide_factor"]
