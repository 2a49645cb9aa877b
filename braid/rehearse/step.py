"""One training step of one rank of a large world, run in this process on fake tensors.

The fake process group (``init_process_group("fake")``) answers every collective at once without peers, and
``FakeTensorMode`` gives every tensor a shape, dtype and device but no data: the real config checks, mesh,
model build (on the meta device), :func:`braid.parallel.parallelize`, forward, backward, gradient clipping
and AdamW step run as rank ``rank`` would run them, with no compute and no memory beyond bookkeeping.

What differs from a GPU rank, and why it does not change the memory:

* the rehearsal runs on the CPU with the GPU's precision (bf16 compute under FSDP2's mixed precision and
  autocast, fp32 master weights, gradients and AdamW state), so the kernels are the torch paths: attention is
  SDPA's flash kernel (O(T) memory, as braid's Triton kernel on the GPU), KDA and the selective scan are the
  chunked torch implementations;
* each sequence is one document (no ``doc_ids``): document masks change which blocks a kernel visits, not
  what it stores;
* dropless MoE routing is assumed balanced where expert parallelism reads split sizes (fake tensors hold no
  counts); the expert-bias update after the step (a few bytes per expert) is left out;
* under a pipeline (``parallel.pp``) the rank builds its stages as the trainer does but runs no schedule:
  it runs, of each stage, as many forwards as the schedule holds at its deepest moment
  (:func:`braid.parallel.pipeline.stashed_micro_batches`), then their backwards — the activations the
  schedule keeps at once; the P2P sends are counted from the stage placement, not run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from braid.config import Config, virtual_stages
from braid.parallel.mesh import ParallelDims, check_world


@dataclass
class Rehearsal:
    world_size: int
    rank: int
    layout: dict
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    expert_params_bytes: int  # the routed experts' part of params_bytes (sharded over ep only)
    activations_peak_bytes: int
    peak_bytes: int
    peak_breakdown: dict
    device_memory_bytes: int
    collectives: list
    grad_accum: int
    micro_batch: list  # [micro_batch_size, tokens per rank]
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device_memory_bytes

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["fits"] = self.fits
        return out


def layout_of(dims: ParallelDims, cfg: Config) -> dict:
    out = {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "cp": dims.cp, "tp": dims.tp,
           "ep": dims.ep, "engine": cfg.parallel.engine, "activation_checkpoint": cfg.parallel.activation_checkpoint,
           "pp": dims.pp}
    if dims.pp > 1:
        out.update(pp_schedule=cfg.parallel.pp_schedule, pp_virtual_stages=virtual_stages(cfg.parallel))
    return out


def compute_dtype(cfg: Config) -> Optional[torch.dtype]:
    """The dtype a GPU rank computes in: bf16 unless ``train.precision=fp32``."""
    return None if cfg.train.precision == "fp32" else torch.bfloat16


@contextlib.contextmanager
def fake_world(world: int, rank: int):
    """The fake process group for ``rank`` of ``world``; destroyed on exit so a later rehearsal can start."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("braid.rehearse needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _manual_reductions(model, mesh, dims: ParallelDims, engine: str) -> tuple[list, float]:
    """The reductions FSDP2 leaves to the trainer and the factor undoing its averaging, as
    :func:`braid.trainer.training_model.build_training_model` sets them up."""
    from braid.parallel.fsdp import expert_sharded_params, grad_divide_factor, scalar_params

    fsdp = mesh.fsdp_mesh() if engine == "fsdp" and dims.dp_cp > 1 else None
    manual: list = []
    if fsdp is not None:
        experts, scalars = expert_sharded_params(model), scalar_params(model)
        if experts:
            replicas = mesh.sub("dp_mod_ep")
            manual.append((experts, replicas.get_group() if replicas.size() > 1 else None))
        if scalars:
            manual.append((scalars, mesh.group("dp_cp")))
    return manual, grad_divide_factor(fsdp)


def _stream_shape(model_cfg, ids_shape) -> tuple:
    """The hidden states between pipeline stages: ``[b, t + meta, (streams,) d]``."""
    from braid.models.connections import n_streams

    n = n_streams(model_cfg)
    return (ids_shape[0], ids_shape[1] + model_cfg.meta_tokens, *((n,) if n else ()), model_cfg.d_model)


def _p2p_collectives(mesh, cfg: Config, hidden: tuple, dtype: torch.dtype, grad_accum: int) -> list:
    """The pipeline's sends of this rank per step (the schedule's P2P is not run here): each stage's output
    to a next stage on another rank, each stage's input gradient to a previous one."""
    from braid.parallel.pipeline import stage_sends

    p = cfg.parallel
    sends = stage_sends(p.pp_schedule, mesh.local_rank("pp"), mesh.dims.pp, virtual_stages(p))
    nbytes = torch.Size(hidden).numel() * dtype.itemsize
    return [{"op": "send", "group": "pp", "count": sends * grad_accum, "bytes": sends * grad_accum * nbytes}] \
        if sends else []


def rehearse(cfg: Config, world: int, rank: int, device_memory: int, vocab: int = 257) -> Rehearsal:
    """Rehearse one optimizer step of ``rank`` in a world of ``world`` ranks (see the module docstring).

    ``vocab``: the tokenizer's size when the model sets no ``vocab_size`` (the real presets all do).
    Raises :class:`braid.errors.ConfigError` (one line, naming the key) for a layout the config cannot run.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from braid.models.hybrid import IGNORE_INDEX, HybridLM, aux_loss
    from braid.models.stats import resolve_vocab
    from braid.parallel.distributed import all_reduce_sum
    from braid.parallel.fsdp import clip_grad_norm_tensor, reduce_manual_grads
    from braid.parallel.mesh import build_mesh
    from braid.parallel.parallelize import parallelize
    from braid.rehearse import memory
    from braid.rehearse.collectives import CollectiveCounter, view_names
    from braid.trainer.optim import build_optimizer

    if not 0 <= rank < world:
        raise ValueError(f"--rank {rank} is not a rank of a world of {world}")
    dims = check_world(cfg, world)
    if cfg.parallel.engine == "deepspeed":
        from braid.errors import ConfigError

        raise ConfigError("config key 'parallel.engine' = 'deepspeed': braid.rehearse rehearses FSDP2 layouts only")
    t = cfg.train
    grad_accum = t.global_batch_size // (t.micro_batch_size * dims.dp)
    model_cfg = resolve_vocab(cfg.model, vocab)
    dtype = compute_dtype(cfg)
    cpu = torch.device("cpu")
    with fake_world(world, rank):
        mesh = build_mesh(dims, "cpu")
        with torch.device("meta"):
            model = HybridLM(model_cfg)
        stash = {0: 1}
        if dims.pp > 1:  # this rank's stages, each parallelised on its own, as the trainer builds them
            from braid.parallel.pipeline import PipelineModel, build_pipeline_model, stashed_micro_batches

            parts, stage_ids, bounds = build_pipeline_model(model, model_cfg, mesh, cfg.parallel, cfg.data.seq_len,
                                                            cfg, device_memory)
            parts = [parallelize(part, mesh, cfg.parallel, cpu, dtype) for part in parts]
            model = PipelineModel(parts, stage_ids, bounds)
            stash = stashed_micro_batches(cfg.parallel.pp_schedule, mesh.local_rank("pp"), dims.pp,
                                          virtual_stages(cfg.parallel), grad_accum)
            stages = list(zip(stage_ids, parts))
        else:
            model = parallelize(model, mesh, cfg.parallel, cpu, dtype)
            stages = [(0, model)]
        manual, loss_factor = _manual_reductions(model, mesh, dims, cfg.parallel.engine)
        loss_group = mesh.group("dp_cp")
        counter = CollectiveCounter(view_names(mesh))
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device=cpu)
            optimizers = [build_optimizer(part, t) for _, part in stages]
            for optimizer in optimizers:
                for group in optimizer.param_groups:  # as on the GPU: one fused kernel, no per-parameter temporaries
                    group["fused"] = True
            params = memory.params_bytes(model)
            experts = memory.expert_params_bytes(model)
            # The state AdamW creates at its first step is there through every later step's forward and
            # backward: create it first, so the tracked step is a steady-state one.
            for p in memory.unique_params(model):
                p.grad = torch.zeros_like(p)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            track = memory.tracker(stages[0][1] if len(stages) == 1 else model, optimizers)
            b, s = t.micro_batch_size, cfg.data.seq_len
            ids = torch.randint(0, model_cfg.vocab_size, (b, s))
            batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(s).expand(b, s)}
            if model.context_parallel is not None:
                batch = model.context_parallel.shard_batch(batch)
            autocast = (torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext())
            hidden = _stream_shape(model_cfg, batch["input_ids"].shape)
            stream_dtype = dtype if dtype is not None and dims.dp_cp > 1 else torch.float32
            with track, counter:
                counter.phase = f"stage{stages[0][0]}"  # once per micro-batch in the trainer
                global_tokens = all_reduce_sum(torch.tensor(float(b * s * dims.dp * grad_accum)), loss_group)
                model.train()
                # A pipeline rank holds, at its schedule's deepest moment, the activations of stash[stage]
                # micro-batches of each stage: run those forwards first, then their backwards.
                pending = []
                for stage, part in stages:
                    counter.phase = f"stage{stage}"
                    last = part.norm is not None
                    for k in range(stash[stage]):
                        if k:  # the trackers refuse a module's second forward while they hold its stats
                            memory.forget_modules(track, part)
                        x = batch["input_ids"]
                        if part.embed is None:  # the received hidden states, kept until this backward
                            x = torch.empty(hidden, dtype=stream_dtype, requires_grad=True)
                        with autocast:
                            out = part(x, labels=batch["labels"] if last else None,
                                       position_ids=batch["position_ids"])
                        # the last stage's objective is the loss; an earlier one's backward starts from the
                        # gradient the next stage sends (same shape as its output)
                        if last:
                            roots, grads = [out.sum() / global_tokens], [None]
                        else:
                            roots, grads = [out], [torch.ones_like(out)]
                        aux = aux_loss(part)
                        if aux is not None:
                            tokens = (batch["labels"] != IGNORE_INDEX).sum()
                            roots.append(aux * (tokens / global_tokens))
                            grads.append(None)
                        pending.append((stage, out.detach().sum() if last else None, roots, grads))
                for stage, _, roots, grads in pending:
                    counter.phase = f"stage{stage}"
                    torch.autograd.backward([r * loss_factor for r in roots], grads)
                counter.phase = "step"
                track.in_step = True
                micro_sum = sum((m for _, m, _, _ in pending if m is not None), torch.zeros(()))
                all_reduce_sum(micro_sum.detach().to(torch.float64), loss_group)
                grads = memory.grads_bytes(model)
                for group_params, group in manual:
                    reduce_manual_grads(group_params, group, loss_factor)
                clip_grad_norm_tensor(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"),
                                      norm_group=mesh.group("pp") if dims.pp > 1 else None)
                for optimizer in optimizers:
                    optimizer.step()
                opt_bytes = sum(memory.optimizer_bytes(o) for o in optimizers)
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
        peak, breakdown = memory.peak_breakdown(track)
        # each stage's records stand for its stash of micro-batches; a step runs grad_accum of them
        collectives = counter.summary({f"stage{st}": grad_accum / stash[st] for st, _ in stages})
        if dims.pp > 1:
            collectives += _p2p_collectives(mesh, cfg, hidden, stream_dtype, grad_accum)
        local_tokens = int(batch["input_ids"].shape[1])
    # Gradient accumulation keeps the same buffers alive across micro-batches: one micro-batch's peak is the step's.
    return Rehearsal(world_size=world, rank=rank, layout=layout_of(dims, cfg), params_bytes=params,
                     grads_bytes=grads, optimizer_bytes=opt_bytes, expert_params_bytes=experts,
                     activations_peak_bytes=track.activations_peak,
                     peak_bytes=peak, peak_breakdown=breakdown, device_memory_bytes=device_memory,
                     collectives=collectives, grad_accum=grad_accum, micro_batch=[b, local_tokens])
