"""Tensor parallelism (Megatron-style) for every braid mixer, the FFNs and a vocab-parallel head/loss.

How a module is sharded (``shard_module``):

* Every parameter of a tensor-parallel module becomes a DTensor on the tp mesh, ``Shard(dim)`` where
  its plan says so (heads, channels, experts' hidden units...) and ``Replicate()`` otherwise. The
  global view is what FSDP2 and DCP see, so checkpoints reshard between layouts.
* The module's forward runs unchanged, single-device code on the *local* shards: for the duration
  of the call each DTensor parameter is swapped for its local tensor, and the plan sets the local
  head counts (``n_heads`` etc.) once. This is why no mixer needs DTensor-aware code and why our own
  kernels (attention, KDA, selective scan) run under TP as they are.
* The communication is explicit at the module boundary (``tp_plans/comm.py``): the replicated input
  (or, with sequence parallelism, the all-gathered sequence) enters with an all-reduce backward, the
  partial output leaves through an all-reduce (or reduce-scatter). Inside, each rank's gradient of a
  replicated parameter covers its own heads/channels only, so replicated parameters get their
  gradient all-reduced over tp (Megatron's rule for weights shared by sharded computation).

Why not ``parallelize_module`` with Colwise/RowwiseParallel: braid's mixers read weights directly
(FoX's fp32 forget gate, KDA's depthwise convs and decay parameters, Hymba's packed ``in_proj``
and the experts' packed ``gate_up``, MLA's shared rope key), so a Linear-level DTensor plan would
need DTensor-aware mixer code and would still leave the non-Linear parameters and the packed
layouts. The plans in ``tp_plans/mixers.py``
are the same Megatron layout (column-parallel in, row-parallel out) stated per parameter.

KV heads fewer than tp ranks (tp a multiple of ``n_kv_heads``, attention/gated attention/FoX): as in
Megatron, the KV projections are replicated and rank r uses KV head ``r // (tp / n_kv_heads)``. They
are ordinary ``Replicate()`` DTensors holding the full weight (so FSDP2 and DCP see the unsharded
layout, as for any replicated weight); ``ModulePlan.pick`` cuts the rank's rows inside the forward,
and the usual tp all-reduce of replicated gradients sums the replicas of each KV head.

What stays plain (not a DTensor, same on every tp rank, computed redundantly): the final norm, the
meta tokens, the MoE router and expert bias (routing is replicated, ``tp_plans/moe.py``), and,
without sequence parallelism, the connections' norms. Packed projections (Hymba's ``in_proj``, the
experts' ``[gate | up]``) are plain ``Shard``s whose outputs one all-to-all re-lays per rank
(``comm.PackedColumns``).

Sequence parallelism (``sequence_parallel=True``): between blocks the residual stream is split along
time; connections (norms, hyper-connections) run on the local chunk with their weights' gradients
all-reduced; mixers and SwiGLU all-gather their input and reduce-scatter their output. The stream is
split at the first block's input and gathered after the last block (the embedding, meta tokens and
final norm run replicated), so ``(seq_len + meta_tokens)`` must be divisible by tp.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from braid.errors import ConfigError
from braid.parallel.tp_plans import comm


@dataclass
class ModulePlan:
    """How one module is sharded over tp.

    shard: parameter name (relative to the module) → the dim split over tp; unlisted ones replicate.
    local: attribute → its per-rank value (head counts, channel counts) set once at apply time.
    setup: optional extra changes on the module (hooks for reductions in the middle of a mixer).
    pick: replicated parameter name → ``rank → [(start, length), ...]``: the dim-0 row ranges of the
        full (replicated) weight this tp rank computes with (KV heads replicated when tp > n_kv_heads,
        Megatron-style). The rows are cut after the all-reduce-backward copy, so each rank's gradient
        is zero outside its rows and the tp all-reduce sums the replicas sharing a row.
    """

    shard: dict[str, int] = field(default_factory=dict)
    local: dict[str, int] = field(default_factory=dict)
    setup: Optional[Callable[[nn.Module, object], None]] = None
    pick: dict[str, Callable[[int], list]] = field(default_factory=dict)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attr


def _distribute(module: nn.Module, mesh: DeviceMesh, shard: dict[str, int]) -> None:
    """Turn every parameter of ``module`` into a DTensor: ``Shard(shard[name])`` or ``Replicate()``."""
    for name, p in list(module.named_parameters()):
        if isinstance(p, DTensor):
            continue
        placement = Shard(shard[name]) if name in shard else Replicate()
        owner, attr = _owner(module, name)
        new = nn.Parameter(distribute_tensor(p.data, mesh, [placement]), requires_grad=p.requires_grad)
        new.__dict__.update(p.__dict__)  # keeps markers such as _no_weight_decay
        owner.register_parameter(attr, new)


@contextmanager
def _local_params(module: nn.Module, plan: ModulePlan, group, picks: Optional[dict] = None):
    """Swap the module's DTensor parameters for their local tensors while the body runs
    (``picks``: replicated name → row ranges this rank uses, see :attr:`ModulePlan.pick`)."""
    swapped = []
    try:
        for name, p in list(module.named_parameters()):
            if not isinstance(p, DTensor):
                continue
            owner, attr = _owner(module, name)
            local = p.to_local()
            if name not in plan.shard:
                local = comm.copy_to_tp(local, group)  # replicated weight, partial gradient per rank
                if picks and name in picks:
                    parts = [local.narrow(0, start, n) for start, n in picks[name]]
                    local = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            swapped.append((owner, attr, p))
            owner._parameters[attr] = local  # a plain tensor for this call only
        yield
    finally:
        for owner, attr, p in swapped:
            owner._parameters[attr] = p


def shard_module(module: nn.Module, mesh: DeviceMesh, plan: ModulePlan,
                 enter: Callable[[torch.Tensor], torch.Tensor], leave: Callable[[torch.Tensor], torch.Tensor],
                 body: Optional[Callable] = None) -> None:
    """Distribute ``module``'s parameters per ``plan`` and run its forward on local shards.

    ``enter``/``leave`` map the first input and the output (the boundary collectives); ``body``
    replaces the forward computation (default: the module's own forward).
    """
    group = mesh.get_group()
    picks = {name: fn(mesh.get_local_rank()) for name, fn in plan.pick.items()}
    _distribute(module, mesh, plan.shard)
    global_sizes = {attr: getattr(module, attr) for attr in plan.local}
    for attr, value in plan.local.items():
        setattr(module, attr, value)
    if "reset_parameters" in type(module).__dict__:
        _reset_on_global_view(module, global_sizes, plan.local)
    if plan.setup is not None:
        plan.setup(module, group)
    inner = body if body is not None else module.forward

    def forward(x, *args, **kwargs):
        x = enter(x)
        with _local_params(module, plan, group, picks):
            y = inner(x, *args, **kwargs)
        return leave(y)

    module.forward = forward


def _reset_on_global_view(module: nn.Module, global_sizes: dict, local_sizes: dict) -> None:
    """Let the module's own ``reset_parameters`` (decay rates, gate biases...) run after sharding.

    It runs on plain full-size copies of the module's parameters with the global sizes, exactly as
    unsharded (same values from the same RNG state; DTensor's own random ops are per-shard
    duplicates on CPU), and each rank keeps its slice. Transient memory: one module's parameters.
    """
    inner = module.reset_parameters

    @torch.no_grad()
    def reset_parameters() -> None:
        sharded = [(name, p) for name, p in module.named_parameters() if isinstance(p, DTensor)]
        for attr, value in global_sizes.items():
            setattr(module, attr, value)
        try:
            for name, p in sharded:
                owner, attr = _owner(module, name)
                owner._parameters[attr] = p.full_tensor()
            inner()
            for name, p in sharded:
                owner, attr = _owner(module, name)
                full = owner._parameters[attr]
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
        finally:
            for name, p in sharded:
                owner, attr = _owner(module, name)
                owner._parameters[attr] = p
            for attr, value in local_sizes.items():
                setattr(module, attr, value)

    module.reset_parameters = reset_parameters


# ---------------------------------------------------------------------------- vocab parallel

def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy from vocab-sharded logits, without gathering them.

    Args:
        logits: ``[..., V/p]`` this rank's vocab slice ``[vocab_start, vocab_start + V/p)`` (any float).
        labels: ``[...]`` int64 global token ids (``ignore_index`` = ignored).
    Returns:
        ``[...]`` fp32 losses (0 where ignored), identical on every tp rank; a new tensor, not a view.
    """
    z = logits.float()
    vl = z.shape[-1]
    m = z.detach().amax(-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)  # a shift only: no gradient needed
    sum_exp = comm.reduce_from_tp((z - m[..., None]).exp().sum(-1), group)
    local = labels - vocab_start
    mine = (local >= 0) & (local < vl)
    target = z.gather(-1, local.clamp(0, vl - 1)[..., None]).squeeze(-1)
    target = comm.reduce_from_tp(torch.where(mine, target, torch.zeros_like(target)), group)
    loss = sum_exp.log() + m - target
    return torch.where(labels == ignore_index, torch.zeros_like(loss), loss)


def _vocab_parallel_embedding(embed: nn.Embedding, mesh: DeviceMesh) -> None:
    """Rows (token ids) sharded over tp; ids of other ranks give zeros, then one all-reduce."""
    group, p, r = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    vl = embed.num_embeddings // p

    def body(ids: torch.Tensor) -> torch.Tensor:
        local = ids - r * vl
        mine = (local >= 0) & (local < vl)
        out = F.embedding(local.clamp(0, vl - 1), embed.weight)
        return out * mine[..., None].to(out.dtype)

    shard_module(embed, mesh, ModulePlan(shard={"weight": 0}), enter=lambda x: x,
                 leave=lambda y: comm.reduce_from_tp(y, group), body=body)


def _vocab_parallel_output(model: nn.Module, mesh: DeviceMesh) -> None:
    """Replace ``model.output`` (LM head + loss) by its vocab-parallel version."""
    group, p, r = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    vl = model.cfg.vocab_size // p
    if model.lm_head is not None:
        _distribute(model.lm_head, mesh, {"weight": 0})
    ignore = -100

    def output(self, h: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        w = self._head_weight().to_local()  # [V/p, d], Shard(0) of the head (or tied embedding)
        logits = F.linear(comm.copy_to_tp(h, group), w)  # [B, T, V/p]
        if labels is None:  # full logits for generation (not differentiable)
            parts = [torch.empty_like(logits) for _ in range(p)]
            dist.all_gather(parts, logits.contiguous(), group=group)
            return torch.cat(parts, dim=-1)
        # [B, T] as computed: a reshaped [B·T] loss would be a view, which FSDP2 warns about as an output.
        return vocab_parallel_cross_entropy(logits, labels, r * vl, group, ignore)

    model.output = types.MethodType(output, model)


# ---------------------------------------------------------------------------- the model

def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _seq_split_enter(group, p: int):
    def enter(h: torch.Tensor) -> torch.Tensor:
        _check(h.shape[1] % p == 0, "parallel.sequence_parallel",
               f"the sequence (data.seq_len + model.meta_tokens = {h.shape[1]}) must be divisible by "
               f"parallel.tp = {p}")
        return comm.split_seq(h, group)
    return enter


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard a built :class:`~braid.models.hybrid.HybridLM` in place over the 1-D ``tp_mesh``.

    Call before FSDP2 (torchtitan order: TP → AC → compile → FSDP). Sizes that do not divide by tp
    raise a :class:`ConfigError` naming the key. Every rank must hold the same weights (same seed) or
    a meta-device model; rank 0's values are scattered.

    After this, ``model(input_ids, labels)`` returns the same per-token losses ``[B, T]`` on every tp
    rank (so the loss and gradient reductions run over data × context ranks only), and the gradients
    of tp-sharded and tp-replicated parameters are complete on each tp rank.
    """
    from braid.models.moe import MoE
    from braid.parallel.tp_plans.mixers import ffn_plan, mixer_plan
    from braid.parallel.tp_plans.moe import shard_moe

    p = tp_mesh.size()
    if p == 1:
        return
    group = tp_mesh.get_group()
    cfg = model.cfg
    _check(cfg.vocab_size % p == 0, "model.vocab_size",
           f"{cfg.vocab_size} must be divisible by parallel.tp = {p} (raise model.vocab_multiple)")
    sp = sequence_parallel
    if sp:
        enter = lambda x: comm.gather_seq_for_shard(x, group)  # noqa: E731
        leave = lambda y: comm.reduce_scatter_seq(y, group)  # noqa: E731
    else:
        enter = lambda x: comm.copy_to_tp(x, group)  # noqa: E731
        leave = lambda y: comm.reduce_from_tp(y, group)  # noqa: E731
    for block in model.layers:
        shard_module(block.mixer, tp_mesh, mixer_plan(block.mixer, p), enter, leave)
        if isinstance(block.ffn, MoE):
            shard_moe(block.ffn, tp_mesh, sp)
        elif block.ffn is not None:
            shard_module(block.ffn, tp_mesh, ffn_plan(block.ffn, p), enter, leave)
        if sp:  # norms / hyper-connections run on the local chunk: all their weights replicate
            for conn in (block.mixer_conn, block.ffn_conn):
                if conn is not None:
                    shard_module(conn, tp_mesh, ModulePlan(), lambda x: x, lambda y: y)
    if sp:
        _wrap_io(model.layers[0], _seq_split_enter(group, p), lambda y: y)
        _wrap_io(model.layers[-1], lambda x: x, lambda y: comm.gather_seq_for_replicated(y, group))
    _vocab_parallel_embedding(model.embed, tp_mesh)
    _vocab_parallel_output(model, tp_mesh)


def _wrap_io(module: nn.Module, enter, leave) -> None:
    """Map a module's first input and its output, nothing else (no parameter changes)."""
    inner = module.forward

    def forward(x, *args, **kwargs):
        return leave(inner(enter(x), *args, **kwargs))

    module.forward = forward


__all__ = ["apply_tp", "ModulePlan", "shard_module", "vocab_parallel_cross_entropy"]
