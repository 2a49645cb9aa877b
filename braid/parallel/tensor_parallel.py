"""Tensor parallelism (Megatron-style) for every braid mixer, the FFNs and a vocab-parallel head/loss.

What to shard is data the modules declare (``tp_plan(tp)``, :mod:`braid.models.tp_plan`); this file
applies any plan the same way and names no mixer. How a module is sharded (``shard_module``):

* Every parameter of a tensor-parallel module becomes a DTensor on the tp mesh, ``Shard(dim)`` where
  its plan says so (heads, channels, experts' hidden units...) and ``Replicate()`` otherwise. The
  registered parameters stay these DTensors: the global view is what FSDP2, DCP and the optimizer
  see, so checkpoints reshard between layouts.
* The module's forward runs unchanged, single-device code on the *local* shards: a forward
  pre-hook binds each parameter's local tensor as an instance attribute of its owner, which reads
  before the registered parameter (``nn.Module`` looks ``_parameters`` up only when an attribute is
  missing), and the forward hook unbinds them; the registered parameters are never touched. A
  mixer infers its local head counts from these shapes. This is why no mixer needs DTensor-aware
  code and why our own kernels (attention, delta rule, selective scan) run under TP as they are.
* The communication is explicit at the module boundary (:mod:`braid.parallel.collectives`), in the
  same two hooks: the replicated input (or, with sequence parallelism, the all-gathered sequence)
  enters with an all-reduce backward, the partial output leaves through an all-reduce (or
  reduce-scatter). Inside, each rank's gradient of a replicated parameter covers its own
  heads/channels only, so replicated parameters are read through ``copy_to_region`` (their gradient is
  all-reduced over tp, Megatron's rule for weights shared by sharded computation).

Why not ``parallelize_module`` with Colwise/RowwiseParallel: braid's mixers read weights directly
(fp32 gate projections, depthwise convs, decay parameters, packed projections such as ``[q|k|v|x|z]``
and the experts' ``[gate | up]``, a rope key shared by all heads), so a Linear-level DTensor plan would
need DTensor-aware mixer code and would still leave the non-Linear parameters and the packed
layouts. The declared plans are the same Megatron layout (column-parallel in, row-parallel out)
stated per parameter. ``torch.nn.utils.parametrize`` would give the same local reads but renames
every parameter (``….parametrizations.weight.original``): checkpoints and FSDP2's names would change.

KV heads fewer than tp ranks (``Heads(shared=True)``): as in
Megatron, the KV projections are replicated and rank r uses KV head ``r // (tp / n_kv_heads)``. They
are ordinary ``Replicate()`` DTensors holding the full weight (so FSDP2 and DCP see the unsharded
layout, as for any replicated weight); the rank's rows are cut after the all-reduce-backward copy,
and the usual tp all-reduce of replicated gradients sums the replicas of each KV head.

What stays plain (not a DTensor, same on every tp rank, computed redundantly): the final norm, the
meta tokens, ``plain`` parameters such as the MoE router (routing is replicated), and,
without sequence parallelism, the connections' norms. Packed projections (``Rows(packed_output=True)``,
the experts' ``[gate | up]``) are plain ``Shard``s whose outputs one all-to-all re-lays per rank
(``collectives.PackedColumns``).

Re-initialisation (``HybridLM.reset_parameters`` after a meta-device build) runs a module's own
``reset_parameters`` inside the reset view TP registers (:func:`braid.models.tp_plan.reset_view`):
on full-size copies, exactly as unsharded, each rank keeping its slice.

Sequence parallelism (``sequence_parallel=True``): between blocks the residual stream is split along
time; connections (norms, hyper-connections) run on the local chunk with their weights' gradients
all-reduced; mixers and dense FFNs all-gather their input and reduce-scatter their output. The stream is
split at the first block's input and gathered after the last block (the embedding, meta tokens and
final norm run replicated), so ``(seq_len + meta_tokens)`` must be divisible by tp.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from braid.errors import ConfigError
from braid.models.tp_plan import Rows, Split, TPPlan, rank_rows, set_reset_view
from braid.parallel import collectives as comm


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attr


def _distribute(module: nn.Module, mesh: DeviceMesh, shard: dict[str, int], plain: tuple = ()) -> None:
    """Turn every parameter of ``module`` but ``plain`` into a DTensor: ``Shard(shard[name])`` or
    ``Replicate()``."""
    for name, p in list(module.named_parameters()):
        if isinstance(p, DTensor) or name in plain:
            continue
        placement = Shard(shard[name]) if name in shard else Replicate()
        owner, attr = _owner(module, name)
        new = nn.Parameter(distribute_tensor(p.data, mesh, [placement]), requires_grad=p.requires_grad)
        new.__dict__.update(p.__dict__)  # keeps markers such as _no_weight_decay
        owner.register_parameter(attr, new)


def _is_even_shard(ranges: list[list[tuple[int, int]]], n_rows: int) -> bool:
    """Whether rank r's rows are exactly the r-th contiguous 1/tp of ``n_rows`` for every r."""
    tp = len(ranges)
    return n_rows % tp == 0 and all(rows == [(r * n_rows // tp, n_rows // tp)] for r, rows in enumerate(ranges))


def _columns(rows: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(start, start + n) for start, n in rows])


class _Sharding:
    """A plan resolved for one module at ``tp`` ranks: placements, row picks and packed outputs."""

    def __init__(self, module: nn.Module, plan: TPPlan, tp: int, rank: int):
        params = dict(module.named_parameters())
        self.shard: dict[str, int] = {}
        self.picks: dict[str, list] = {}  # replicated name → this rank's dim-0 row ranges
        self.packed: dict[str, tuple[list, int]] = {}  # Linear name → (wanted columns per rank, columns)
        for name, spec in plan.params.items():
            if name not in params:
                raise ConfigError(f"config key 'parallel.tp' = {tp}: the tensor-parallel plan of "
                                  f"{type(module).__name__} names '{name}', which it does not have")
            size = params[name].shape
            if isinstance(spec, Split):
                if size[spec.dim] % tp:
                    raise ConfigError(f"config key 'parallel.tp' = {tp}: {type(module).__name__}.{name} has "
                                      f"{size[spec.dim]} rows in dim {spec.dim}, not divisible by tp")
                self.shard[name] = spec.dim
                continue
            assert isinstance(spec, Rows), spec
            layout_rows = spec.groups * sum(b.count * b.rows for b in spec.blocks)
            assert layout_rows == size[0], f"{type(module).__name__}.{name}: plan {layout_rows} rows, has {size[0]}"
            ranges = [rank_rows(spec, tp, r) for r in range(tp)]
            if _is_even_shard(ranges, size[0]):
                self.shard[name] = 0
            elif spec.packed_output:
                owner, attr = name.rsplit(".", 1)
                assert attr == "weight", f"{name}: packed rows re-lay a Linear's output"
                self.shard[name] = 0
                self.packed[owner] = ([_columns(r) for r in ranges], size[0])
            else:
                self.picks[name] = ranges[rank]


def _bind_local(module: nn.Module, shard: dict[str, int], picks: dict[str, list], group,
                children: tuple = ()) -> list:
    """Bind each DTensor parameter's local tensor on its owner for one forward (see module doc);
    ``children`` (sharded by their own plans) bind theirs in their own forward."""
    bound = []
    for name, p in module.named_parameters():
        if not isinstance(p, DTensor) or name.startswith(tuple(c + "." for c in children)):
            continue
        owner, attr = _owner(module, name)
        local = p.to_local()
        if name not in shard:
            local = comm.copy_to_region(local, group)  # replicated weight, partial gradient per rank
            if name in picks:
                parts = [local.narrow(0, start, n) for start, n in picks[name]]
                local = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        owner.__dict__[attr] = local
        bound.append((owner, attr))
    return bound


def _unbind(bound: list) -> None:
    for owner, attr in bound:
        owner.__dict__.pop(attr, None)


def _map_io(module: nn.Module, enter: Callable, leave: Callable,
            bind: Optional[Callable[[], list]] = None) -> None:
    """Map the module's first input (``enter``) and its output (``leave``) by forward hooks, with
    ``bind()``'s parameter views in place while the forward runs."""
    bound: list = []

    def pre(mod, args, kwargs):
        if bind is not None:
            bound.extend(bind())
        return (enter(args[0]), *args[1:]), kwargs

    def unbind(mod, args, out):  # also when the forward raises (always_call), and first
        _unbind(bound)
        bound.clear()

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(unbind, always_call=True)
    module.register_forward_hook(lambda mod, args, out: leave(out))


def _split_rms_norm(norm: nn.Module, full_dim: int, group) -> None:
    """An RMSNorm whose channels are split over tp: its output is recomputed from the all-reduced
    sum of squares (both ways), replacing the local statistic's."""

    def post(mod, args, out):
        x = args[0]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        ss = comm.all_reduce_sum(xf.pow(2).sum(-1, keepdim=True), group, "tp.all_reduce")
        y = xf * torch.rsqrt(ss / full_dim + mod.eps)
        return y.to(x.dtype) * mod.weight.to(x.dtype)

    norm.register_forward_hook(post)


def shard_module(module: nn.Module, mesh: DeviceMesh, plan: TPPlan,
                 enter: Callable[[torch.Tensor], torch.Tensor], leave: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Distribute ``module``'s parameters per ``plan`` and run its forward on local shards.

    ``enter``/``leave`` map the first input and the output (the boundary collectives).
    """
    group, tp, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    for name, child in plan.children.items():
        shard_module(module.get_submodule(name), mesh, child, lambda x: x, lambda y: y)
    sharding = _Sharding(module, plan, tp, rank)
    _distribute(module, mesh, sharding.shard, plan.plain)
    for name, (wanted, n_cols) in sharding.packed.items():
        relayout = comm.PackedColumns(wanted, n_cols, group)
        module.get_submodule(name).register_forward_hook(lambda mod, inp, out, f=relayout: f(out))
    for name, sizes in plan.packed_outputs.items():
        relayout = comm.PackedColumns.blocks(list(sizes), group)
        module.get_submodule(name).register_forward_hook(lambda mod, inp, out, f=relayout: f(out))
    for name in plan.copy_outputs:
        module.get_submodule(name).register_forward_hook(lambda mod, inp, out: comm.copy_to_region(out, group))
    for name in plan.reduce_outputs:
        module.get_submodule(name).register_forward_hook(
            lambda mod, inp, out: comm.all_reduce_sum(out, group, "tp.all_reduce"))
    for name, full_dim in plan.split_norms.items():
        _split_rms_norm(module.get_submodule(name), full_dim, group)
    if plan.at_rank is not None:
        plan.at_rank(rank, tp)
    if "reset_parameters" in type(module).__dict__:
        set_reset_view(module, _global_view)
    children = tuple(plan.children)
    _map_io(module, enter, leave, lambda: _bind_local(module, sharding.shard, sharding.picks, group, children))


def boundary(plan: TPPlan, group, sequence_parallel: bool) -> tuple[Callable, Callable]:
    """The collectives a sharded module's input enters and its partial output leaves through."""
    if sequence_parallel:  # the whole sequence in, this rank's chunk of the sum out
        enter = lambda x: comm.gather_from_sequence(x, group, not plan.replicated_input)  # noqa: E731
        return enter, lambda y: comm.reduce_scatter_to_sequence(y, group)
    enter = (lambda x: x) if plan.replicated_input else (lambda x: comm.copy_to_region(x, group))
    return enter, lambda y: comm.reduce_from_region(y, group)


@contextmanager
def _global_view(module: nn.Module):
    """The module's own ``reset_parameters`` (decay rates, gate biases...) after sharding.

    It runs on plain full-size copies of the module's parameters (bound like the forward's local
    views), exactly as unsharded (same values from the same RNG state; DTensor's own random ops are
    per-shard duplicates on CPU), and each rank keeps its slice. Transient memory: one module's
    parameters.
    """
    sharded = [(name, p) for name, p in module.named_parameters() if isinstance(p, DTensor)]
    bound = []
    try:
        with torch.no_grad():
            for name, p in sharded:
                owner, attr = _owner(module, name)
                owner.__dict__[attr] = p.full_tensor()
                bound.append((owner, attr))
        yield
        with torch.no_grad():
            for name, p in sharded:
                owner, attr = _owner(module, name)
                full = owner.__dict__[attr]
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
    finally:
        _unbind(bound)


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
    sum_exp = comm.reduce_from_region((z - m[..., None]).exp().sum(-1), group)
    local = labels - vocab_start
    mine = (local >= 0) & (local < vl)
    target = z.gather(-1, local.clamp(0, vl - 1)[..., None]).squeeze(-1)
    target = comm.reduce_from_region(torch.where(mine, target, torch.zeros_like(target)), group)
    loss = sum_exp.log() + m - target
    return torch.where(labels == ignore_index, torch.zeros_like(loss), loss)


def _vocab_parallel_embedding(embed: nn.Embedding, mesh: DeviceMesh) -> None:
    """Rows (token ids) sharded over tp; ids of other ranks give zeros, then one all-reduce. The ids
    enter as this rank's row indices (clamped), and the forward hook zeroes the foreign ones."""
    group, p, r = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    vl = embed.num_embeddings // p
    _distribute(embed, mesh, {"weight": 0})
    mine: dict = {}  # this call's mask of the ids in this rank's rows

    def enter(ids: torch.Tensor) -> torch.Tensor:
        local = ids - r * vl
        mine["ids"] = (local >= 0) & (local < vl)
        return local.clamp(0, vl - 1)

    def leave(out: torch.Tensor) -> torch.Tensor:
        return comm.reduce_from_region(out * mine.pop("ids")[..., None].to(out.dtype), group)

    _map_io(embed, enter, leave, lambda: _bind_local(embed, {"weight": 0}, {}, group))


class VocabParallelHeadLoss(nn.Module):
    """:class:`~braid.models.hybrid.HeadLoss` over a head weight split by vocab rows (``Shard(0)``):
    this rank's logits ``[B, T, V/p]`` and :func:`vocab_parallel_cross_entropy`, never the full
    logits (gathered only without labels, for generation, not differentiable)."""

    def __init__(self, group, vocab_start: int, ignore_index: int = -100):
        super().__init__()
        self.group, self.vocab_start, self.ignore_index = group, vocab_start, ignore_index

    def forward(self, h: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        w = weight.to_local()  # [V/p, d], Shard(0) of the head (or tied embedding)
        logits = F.linear(comm.copy_to_region(h, self.group), w)  # [B, T, V/p]
        if labels is None:
            parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, logits.contiguous(), group=self.group)
            return torch.cat(parts, dim=-1)
        # [B, T] as computed: a reshaped [B·T] loss would be a view, which FSDP2 warns about as an output.
        return vocab_parallel_cross_entropy(logits, labels, self.vocab_start, self.group, self.ignore_index)


def _vocab_parallel_output(model: nn.Module, mesh: DeviceMesh) -> None:
    """The LM head (or the tied embedding, already split) by vocab rows and its vocab-parallel loss."""
    if model.lm_head is not None:
        _distribute(model.lm_head, mesh, {"weight": 0})
    vl = model.cfg.vocab_size // mesh.size()
    model.head_loss = VocabParallelHeadLoss(mesh.get_group(), mesh.get_local_rank() * vl)


# ---------------------------------------------------------------------------- the model

def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _seq_split_enter(group, p: int):
    def enter(h: torch.Tensor) -> torch.Tensor:
        _check(h.shape[1] % p == 0, "parallel.sequence_parallel",
               f"the sequence (data.seq_len + model.meta_tokens = {h.shape[1]}) must be divisible by "
               f"parallel.tp = {p}")
        return comm.scatter_to_sequence(h, group)
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
    from braid.parallel.tp_plans.mixers import module_plan

    p = tp_mesh.size()
    if p == 1:
        return
    group = tp_mesh.get_group()
    cfg = model.cfg
    _check(cfg.vocab_size % p == 0, "model.vocab_size",
           f"{cfg.vocab_size} must be divisible by parallel.tp = {p} (raise model.vocab_multiple)")
    sp = sequence_parallel
    for block in model.layers:
        for module in (block.mixer, block.ffn):
            if module is not None:
                plan = module_plan(module, p)
                shard_module(module, tp_mesh, plan, *boundary(plan, group, sp))
        if sp:  # norms / hyper-connections run on the local chunk: all their weights replicate
            for conn in (block.mixer_conn, block.ffn_conn):
                if conn is not None:
                    shard_module(conn, tp_mesh, TPPlan(), lambda x: x, lambda y: y)
    if sp:
        _map_io(model.layers[0], _seq_split_enter(group, p), lambda y: y)
        gather = lambda y: comm.gather_from_sequence(y, group, tensor_parallel_output_grad=False)  # noqa: E731
        _map_io(model.layers[-1], lambda x: x, gather)
    if model.embed is not None:  # pipeline stages after the first have none
        _vocab_parallel_embedding(model.embed, tp_mesh)
    if model.norm is not None:  # the last pipeline stage (or the whole model)
        _vocab_parallel_output(model, tp_mesh)


__all__ = ["apply_tp", "boundary", "shard_module", "vocab_parallel_cross_entropy"]
