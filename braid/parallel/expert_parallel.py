"""Expert parallelism: the routed experts of every MoE layer sharded over an ep mesh.

Each rank routes its own tokens exactly as the unsharded layer does (router, bias, group limit,
capacity, load counts and auxiliary losses are untouched: they see this rank's tokens only). Only
the expert computation (``MoE.experts``) changes:

1. dispatch: the token–expert pairs, already sorted by expert, go to the rank owning their expert
   (experts ``[j·E/ep, (j+1)·E/ep)`` live on ep rank j) with one ``all_to_all_single``; the per-expert
   pair counts travel first (one small all-to-all) so every rank knows its split sizes;
2. the received pairs (grouped by source rank, then local expert) are reordered expert-major and
   run through the local experts' grouped GEMMs;
3. combine: the outputs return along the inverse all-to-all, in the original pair order, and the
   layer weights and scatter-adds them as before.

The backward of each all-to-all is the all-to-all with the splits swapped, so a local expert's
weight gradient sums over every ep rank's tokens: the data-parallel gradient reduction of
``gate_up``/``down`` must therefore run only over the replicas of the same experts (the dp ranks
outside this ep group), while the router and shared experts reduce over all dp ranks as usual.
Load counts stay per rank; ``moe_step``'s all-reduce over the data × context ranks (which include
the ep ranks: they see different tokens) sums them as before.

Split sizes are read on the host (``.tolist()``): one sync per layer, as in every all-to-all MoE.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from braid.errors import ConfigError
from braid.parallel.collectives import all_to_all_rows


def _split_sizes(xs, group_sizes, recv_sizes, ep: int, e_local: int) -> tuple[list, list]:
    """Rows sent to and received from each ep rank. On fake tensors (``python -m braid.rehearse``) there
    are no counts to read: the rehearsal assumes balanced routing, every rank sending and receiving
    ``P / ep`` of its P pairs (dropless routing keeps P fixed)."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(group_sizes):
        rows = xs.shape[0]
        even = [rows // ep + (r < rows % ep) for r in range(ep)]
        return even, even
    return group_sizes.view(ep, e_local).sum(1).tolist(), recv_sizes.sum(1).tolist()


class ExpertParallelExperts(nn.Module):
    """``MoE.experts`` (same contract) on an ep group of ``ep`` ranks: dispatch, local experts, combine."""

    def __init__(self, group, ep: int):
        super().__init__()
        self.group, self.ep = group, ep

    def forward(self, moe: nn.Module, xs: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        group, ep = self.group, self.ep
        e_local = moe.n_experts // ep
        recv_sizes = torch.empty_like(group_sizes)
        dist.all_to_all_single(recv_sizes, group_sizes.contiguous(), group=group)
        recv_sizes = recv_sizes.view(ep, e_local)  # [source rank, local expert]
        in_splits, out_splits = _split_sizes(xs, group_sizes, recv_sizes, ep, e_local)
        recv = all_to_all_rows(xs, out_splits, in_splits, group)
        # Received rows are source-major; the grouped GEMM needs them local-expert-major.
        local_expert = torch.arange(e_local, device=xs.device).repeat(ep)
        row_expert = torch.repeat_interleave(local_expert, recv_sizes.flatten(), output_size=sum(out_splits))
        order = torch.argsort(row_expert, stable=True)
        w1 = moe.gate_up.to_local() if isinstance(moe.gate_up, DTensor) else moe.gate_up
        w2 = moe.down.to_local() if isinstance(moe.down, DTensor) else moe.down
        # Under tp the local experts hold this rank's hidden units only (partial outputs, summed by
        # the tp plan's one reduction after the combine).
        y_sorted = moe.expert_ffn(recv[order], recv_sizes.sum(0), w1, w2)
        y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to source-major
        return all_to_all_rows(y, in_splits, out_splits, group)


def _ep_over_tp(p: DTensor, ep_mesh: DeviceMesh, e_local: int) -> nn.Parameter:
    """A tp-sharded expert weight (``MoE.tp_plan``) → a 2-D ``(ep, tp)`` DTensor: experts over
    ep (``Shard(0)``), hidden units over tp as before. Built from the local shard (no communication,
    works on the meta device); the ep view must be a dim of the same root mesh as tp."""
    root = ep_mesh._get_root_mesh()
    try:
        mesh = root[("ep", "tp")]
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ConfigError("config keys 'parallel.ep' and 'parallel.tp': the ep and tp views must be dims of "
                          f"one DeviceMesh to shard experts over both ({exc})") from None
    r = ep_mesh.get_local_rank()
    local = p.to_local()[r * e_local:(r + 1) * e_local]
    new = DTensor.from_local(local, mesh, [Shard(0), p.placements[0]], run_check=False,
                             shape=p.shape, stride=p.stride())
    return nn.Parameter(new, requires_grad=p.requires_grad)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard the routed experts of every :class:`~braid.models.moe.MoE` in ``model`` over ``ep_mesh``.

    ``gate_up [E, d, 2h]`` and ``down [E, h, d]`` become ``Shard(0)`` DTensors on the 1-D ep mesh
    (rank 0's values are scattered); the router, the bias and the shared experts stay plain. The
    ep ranks must feed different tokens (ep is carved out of the data × context ranks). After tensor
    parallelism (experts' hidden units over tp) they become ``(Shard(0), Shard(hidden))`` on the
    2-D ``(ep, tp)`` mesh: the ep group of a rank is the ranks with its tp coordinate, which hold the
    same hidden units, so dispatch and combine run unchanged per tp slice.
    """
    from braid.models.moe import MoE

    ep = ep_mesh.size()
    if ep == 1:
        return
    group = ep_mesh.get_group()
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        if module.n_experts % ep:
            raise ConfigError(f"config key 'model.moe.n_experts' = {module.n_experts} must be divisible by "
                              f"parallel.ep = {ep}")
        for name in ("gate_up", "down"):
            p = getattr(module, name)
            if not isinstance(p, DTensor):
                module.register_parameter(name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)])))
            elif p.device_mesh.mesh_dim_names == ("tp",):
                module.register_parameter(name, _ep_over_tp(p, ep_mesh, module.n_experts // ep))
        module.dispatch = ExpertParallelExperts(group, ep)


__all__ = ["apply_ep"]
