"""Pipeline parallelism (``parallel.pp``) through ``torch.distributed.pipelining``.

The model is cut into ``pp × pp_virtual_stages`` stages of consecutive layers, at the ``|`` of the
pattern (``model.stage_layers``) or where the projected forward FLOPs are balanced (the LM head counts on
the last stage) among the splits whose stages fit the GPU, memory breaking ties (:func:`balanced_cuts`).
Each stage is the same HybridLM built on the meta device with the other stages' parts removed
(:func:`prune`): its blocks keep their model-wide indices, so parameter names, the (seed, name) initial
draw and DCP checkpoints are those of every other layout, and a run resumes on another pp.

Stage → rank: looped (stage ``s`` on pp rank ``s mod pp``) for gpipe, 1f1b and interleaved 1F1B; the V
of zero-bubble (rank ``r`` holds stages ``r`` and ``2·pp−1−r``). Every stage receives the micro-batch's
position ids, document ids and labels as keyword inputs (meta-token positions are rebuilt per stage);
the hidden states (hyper-connection streams ``[B, T, n, d]`` included) travel between stages. The last
stage returns the per-token loss; the objective is its sum over the global token count, as without a
pipeline. MoE auxiliary losses join the backward where they are made: each stage attaches them to its
output (:class:`_AttachAux`: identity forward, the loss's weight as its gradient), Megatron's device.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from braid.config import ModelConfig, ParallelConfig, virtual_stages
from braid.errors import ConfigError

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
             "zbv": "ScheduleZBVZeroBubble"}


class StageLayers(nn.ModuleDict):
    """A stage's blocks under their model-wide indices (``layers.<i>.`` names as in the whole model),
    iterated and indexed by position like the ModuleList it replaces."""

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, idx):
        if isinstance(idx, int):
            return list(self._modules.values())[idx]
        return super().__getitem__(idx)

    def __setitem__(self, idx, module: nn.Module) -> None:
        if isinstance(idx, int):
            idx = list(self._modules)[idx]
        super().__setitem__(idx, module)


# ---------------------------------------------------------------------------------------------- the split


def _layer_flops(model_cfg: ModelConfig, seq_len: int, cost=None) -> tuple[list[float], float]:
    from braid.plan.model_cost import layer_costs

    cost = cost or layer_costs(model_cfg, seq_len)
    head = 2.0 * cost.d_model * cost.vocab  # the LM head's forward FLOPs per token, on the last stage
    return [sum(layer.flops.values()) for layer in cost.layers], head


def _minmax_split(n: int, n_stages: int, value, forbidden: frozenset) -> tuple[float, list[int]]:
    """The contiguous split of ``n`` layers into ``n_stages`` (at least one layer a stage, no stage starting
    at a layer in ``forbidden``) whose largest stage value is smallest: (that value, the first layer of
    stages 1..). ``value(stage)``: an ``[n + 1, n + 1]`` array whose ``[j, i]`` is the value of the stage
    holding layers ``[j, i)`` (inf: not allowed). A dynamic programme, exact; the earliest cut wins ties."""
    import numpy as np

    j, i = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    invalid = j >= i
    for f in forbidden:
        if 0 < f <= n:
            invalid[f, :] = True
    best = np.full(n + 1, np.inf)  # best[i]: the smallest max over the stages so far covering layers [0, i)
    best[0] = 0.0
    cuts = []
    for k in range(n_stages):
        cand = np.maximum(best[:, None], np.where(invalid, np.inf, value(k)))
        arg = np.argmin(cand, axis=0)
        best = cand[arg, np.arange(n + 1)]
        cuts.append(arg)
    out, end = [], n
    for k in range(n_stages - 1, 0, -1):
        end = int(cuts[k][end])
        out.append(end)
    return float(best[n]), sorted(out)


def balanced_cuts(weights: list[float], n_stages: int, tail: float = 0.0, forbidden: frozenset = frozenset(),
                  memory=None) -> list[int]:
    """The first layer of stages 1.. that minimises the largest stage's sum of ``weights`` (``tail`` added to
    the last), over contiguous splits with at least one layer a stage and no cut in ``forbidden``.

    ``memory`` (a :class:`braid.plan.memory.SplitMemory`): each stage's bytes on its GPU weigh in too. The
    split is the fastest among those whose every stage fits the GPU (when its size is known), and among
    the equally fast, the one whose fullest stage holds the least; when no split fits, the one whose fullest
    stage holds the least (the nearest to fitting)."""
    import numpy as np

    n = len(weights)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64))])
    span = prefix[None, :] - prefix[:, None]  # [j, i]: the weights of layers [j, i)

    def time(k: int) -> np.ndarray:
        return span + (tail if k == n_stages - 1 else 0.0)

    if memory is None:
        fastest, cuts = _minmax_split(n, n_stages, time, forbidden)
        if fastest == np.inf:
            raise ConfigError(f"config key 'parallel.pp': the {n} layers cannot be cut into {n_stages} stages "
                              f"without separating layers that share state (no cut before layers {sorted(forbidden)})")
        return cuts
    held = [memory.stage_matrix(k, n_stages) for k in range(n_stages)]
    fits = [memory.fits(h) for h in held]
    fastest, _ = _minmax_split(n, n_stages, lambda k: np.where(fits[k], time(k), np.inf), forbidden)
    if fastest == np.inf:  # nothing fits (or nothing can be cut): the nearest to fitting
        balanced_cuts(weights, n_stages, tail, forbidden)  # the one-line error when nothing can be cut
        return _minmax_split(n, n_stages, lambda k: held[k], forbidden)[1]
    bound = fastest * (1 + 1e-9)
    return _minmax_split(n, n_stages, lambda k: np.where(fits[k] & (time(k) <= bound), held[k], np.inf),
                         forbidden)[1]


def shared_state_cuts(model: nn.Module) -> frozenset:
    """Cuts (a stage's first layer) that would separate a layer from the earlier one whose K/V it reuses
    (a mixer's ``kv_source``: Hymba's cross-layer sharing): the K/V does not travel between stages."""
    out = set()
    for i, block in enumerate(model.layers):
        source = getattr(block.mixer, "kv_source", None)
        if source is not None:
            out.update(range(source + 1, i + 1))
    return frozenset(out)


def stage_bounds(model_cfg: ModelConfig, n_stages: int, seq_len: int, forbidden: frozenset = frozenset(),
                 cost=None, memory=None) -> list[tuple[int, int]]:
    """``[(first layer, end)]`` per stage: the pattern's ``|`` marks when given, else balanced (``cost``: the
    model's :class:`braid.plan.model_cost.ModelCost` at ``seq_len`` when already at hand; ``memory``: the
    layout's :class:`braid.plan.memory.SplitMemory`, see :func:`balanced_cuts`)."""
    n = len(model_cfg.pattern)
    if model_cfg.stage_layers:
        cuts = list(model_cfg.stage_layers)
        if len(cuts) + 1 != n_stages:
            raise ConfigError(f"config key 'model.pattern' marks {len(cuts) + 1} stages with '|' but the pipeline "
                              f"has parallel.pp × pp_virtual_stages = {n_stages}")
        bad = sorted(set(cuts) & forbidden)
        if bad:
            raise ConfigError(f"config key 'model.pattern': a '|' before layer {bad[0]} separates it from the layer "
                              "whose K/V it reuses (model.hymba.kv_share_groups); move the mark")
    else:
        weights, head = _layer_flops(model_cfg, seq_len, cost)
        cuts = balanced_cuts(weights, n_stages, head, forbidden, memory)
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))


def rank_stages(schedule: str, pp_rank: int, pp: int, virtual: int) -> list[int]:
    """The stage indices pp rank ``pp_rank`` holds, in order."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(virtual)]


def stage_sends(schedule: str, pp_rank: int, pp: int, virtual: int) -> int:
    """Hidden-state transfers pp rank ``pp_rank`` sends per micro-batch: the output of each of its stages
    whose next stage sits on another rank, and the input gradient of each whose previous one does."""
    owner = {s: r for r in range(pp) for s in rank_stages(schedule, r, pp, virtual)}
    n_stages = len(owner)
    return sum((s + 1 < n_stages and owner[s + 1] != pp_rank) + (s > 0 and owner[s - 1] != pp_rank)
               for s in rank_stages(schedule, pp_rank, pp, virtual))


def stashed_micro_batches(schedule: str, pp_rank: int, pp: int, virtual: int, n_micro: int) -> dict[int, int]:
    """``{stage: micro-batches}`` whose activations pp rank ``pp_rank`` holds at the moment its schedule holds
    the most (forwards run, weight gradients not yet): the depth of each schedule's warm-up as
    ``torch.distributed.pipelining`` orders it (gpipe every micro-batch; 1F1B ``pp − rank``; interleaved 1F1B
    ``(v − 1)·round + 2 (pp − 1 − rank) + 1`` chunk forwards, a round of micro-batches per chunk in turn; zbv
    ``2 pp − 1 − rank`` on its first chunk beside ``rank + 1`` on its second; each at most ``n_micro``)."""
    stages = rank_stages(schedule, pp_rank, pp, virtual)
    if schedule == "gpipe":
        return {s: n_micro for s in stages}
    if schedule == "1f1b":
        return {stages[0]: min(n_micro, pp - pp_rank)}
    if schedule == "zbv":
        return {stages[0]: min(n_micro, 2 * pp - 1 - pp_rank), stages[1]: min(n_micro, pp_rank + 1)}
    per_round = n_micro // max(1, n_micro // pp)
    total = min(n_micro * virtual, (virtual - 1) * per_round + 2 * (pp - 1 - pp_rank) + 1)
    out = dict.fromkeys(stages, 0)
    for i in range(total):
        out[stages[(i // per_round) % virtual]] += 1
    return out


def describe_split(model_cfg: ModelConfig, bounds: list[tuple[int, int]], schedule: str, pp: int,
                   virtual: int) -> str:
    """One banner line: each stage's layers, letters and pp rank."""
    owner = {s: r for r in range(pp) for s in rank_stages(schedule, r, pp, virtual)}
    parts = [f"{s}:{model_cfg.pattern[a:b]}[{a}-{b - 1}]@r{owner[s]}" for s, (a, b) in enumerate(bounds)]
    source = "pattern '|'" if model_cfg.stage_layers else "balanced FLOPs and memory"
    return f"pipeline {schedule}, {len(bounds)} stages ({source}): " + " ".join(parts)


# ---------------------------------------------------------------------------------------------- the parts


def prune(model: nn.Module, lo: int, hi: int) -> nn.Module:
    """Keep layers ``[lo, hi)`` of a HybridLM (on the meta device); the embedding and meta tokens stay on
    the first stage only, the final norm and head (nGPT's logit scales) on the last."""
    n = len(model.layers)
    model.layers = StageLayers({str(i): model.layers[i] for i in range(lo, hi)})
    if lo > 0:
        model.embed = None
        model.meta = None
    if hi < n:
        model.norm = None
        model.lm_head = None
        if hasattr(model, "logit_scale"):
            model.logit_scale = None
    return model


class PipelineModel(nn.Module):
    """This rank's stages (HybridLM parts) as one module, for what walks the whole model: ``parameters()``,
    ``modules()``, ``train()``. Checkpoints read the parts one by one (their names are the model's)."""

    def __init__(self, parts: list[nn.Module], stage_ids: list[int], bounds: list[tuple[int, int]]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.stage_ids, self.bounds = stage_ids, bounds

    @property
    def cfg(self):
        return self.parts[0].cfg

    @property
    def context_parallel(self):
        return self.parts[0].context_parallel


class PartOptimizers:
    """One optimizer per part (a DCP optimizer state dict is per module), stepped together; ``param_groups``
    lists all their groups, so the learning-rate schedule sets them all."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


# ---------------------------------------------------------------------------------------------- the step


class _AttachAux(torch.autograd.Function):
    """``out`` unchanged; in backward, ``aux`` receives gradient ``weight`` (its share of the objective)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, weight: torch.Tensor):
        ctx.save_for_backward(weight)
        ctx.aux_shape = aux.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad, weight.float().expand(ctx.aux_shape), None


class _Stage(nn.Module):
    """What a PipelineStage runs: the part under autocast, its auxiliary losses attached to its output."""

    def __init__(self, part: nn.Module, runner: "Pipeline"):
        super().__init__()
        self.part = part
        self._runner = [runner]  # not a submodule

    def forward(self, x, labels=None, position_ids=None, doc_ids=None):
        from braid.models.hybrid import IGNORE_INDEX, aux_loss

        runner = self._runner[0]
        last = self.part.norm is not None
        with runner.autocast():
            out = self.part(x, labels=labels if last else None, position_ids=position_ids, doc_ids=doc_ids)
        if not last:  # the dtype the stages declared (a no-op unless a mixer promoted the stream)
            out = out.to(runner.stream_dtype)
        aux = aux_loss(self.part)
        if aux is not None:
            share = (labels != IGNORE_INDEX).sum().double() / runner.global_tokens  # no host sync
            runner.aux_sum += aux.detach().double() * share
            if torch.is_grad_enabled():
                out = _AttachAux.apply(out, aux.float(), share * runner.loss_factor)
        return out


class Pipeline:
    """The schedule of this rank's stages and one training (or evaluation) step through it."""

    def __init__(self, model: PipelineModel, mesh, p: ParallelConfig, n_micro: int, device: torch.device,
                 autocast_dtype: Optional[torch.dtype], micro_batch: int, seq_len: int):
        from torch.distributed import pipelining

        self.model, self.device, self.n_micro = model, device, n_micro
        self.autocast_dtype = autocast_dtype
        self.group = mesh.group("pp")
        dims = mesh.dims
        # The residual stream's dtype is the embedding's: FSDP2's compute dtype where it casts (bf16 on GPU),
        # else fp32 (fp32 + bf16 sublayer outputs stay fp32).
        fsdp_casts = device.type == "cuda" and autocast_dtype is not None and dims.dp_cp > 1
        self.stream_dtype = autocast_dtype if fsdp_casts else torch.float32
        n_stages = len(model.bounds)
        self.stages = []
        for part, s in zip(model.parts, model.stage_ids):
            inputs, outputs = self._io(model.cfg, s, n_stages, micro_batch, seq_len // dims.cp)
            # Declared shapes: no metadata-inference forward, which would run the MoE routers (their load
            # counts steer the balancing) on uninitialised tensors.
            self.stages.append(pipelining.PipelineStage(_Stage(part, self), s, n_stages, device, input_args=inputs,
                                                        output_args=outputs, group=self.group))
        self.has_first = 0 in model.stage_ids
        self.has_last = n_stages - 1 in model.stage_ids
        self.schedule_name, self.pp, self.virtual = p.pp_schedule, dims.pp, virtual_stages(p)
        cls = getattr(pipelining, SCHEDULES[p.pp_schedule])
        stage = self.stages[0] if len(self.stages) == 1 else self.stages
        self.schedule = cls(stage, n_microbatches=n_micro, loss_fn=self._loss, scale_grads=False)
        self.global_tokens, self.loss_factor = 1.0, 1.0
        self.loss_sums: list[torch.Tensor] = []
        self.aux_sum = torch.zeros((), dtype=torch.float64)

    def _io(self, cfg: ModelConfig, stage: int, n_stages: int, b: int, t: int) -> tuple:
        """(input, output) of a stage as meta tensors: token ids ``[b, t]`` into the first, the per-token loss
        ``[b, t]`` (fp32) out of the last, the residual stream ``[b, t + meta, (streams,) d]`` between."""
        from braid.models.connections import n_streams

        n = n_streams(cfg)
        hidden = (b, t + cfg.meta_tokens, *((n,) if n else ()), cfg.d_model)

        def meta(shape, dtype):  # floating ones carry gradients (the received buffer must ask for them)
            return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)

        inputs = meta((b, t), torch.long) if stage == 0 else meta(hidden, self.stream_dtype)
        outputs = meta((b, t), torch.float32) if stage == n_stages - 1 else meta(hidden, self.stream_dtype)
        return inputs, outputs

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.loss_sums.append(out.detach().sum().double())
        return out.sum() * (self.loss_factor / self.global_tokens)

    def run(self, batches: list[dict], global_tokens: float, loss_factor: float):
        """Every micro-batch of ``batches`` forward and backward through the schedule; returns this rank's
        (loss sum, weighted aux sum) as fp64 scalars, zero on ranks without the last stage."""
        self.global_tokens, self.loss_factor = float(global_tokens), float(loss_factor)
        self.loss_sums = []
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        cat = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if batches[0][k] is not None}
        kwargs = {k: cat[k] for k in ("position_ids", "doc_ids", "labels") if k in cat}
        args = (cat["input_ids"],) if self.has_first else ()
        self.schedule.step(*args, target=cat["labels"] if self.has_last else None, **kwargs)
        loss_sum = torch.stack(self.loss_sums).sum() if self.loss_sums else torch.zeros((), dtype=torch.float64)
        return loss_sum.to(self.device), self.aux_sum

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> torch.Tensor:
        """The loss sum of ``batches`` (fp64; zero on ranks without the last stage), forward only, as the
        forward half of GPipe runs: each rank takes its stages in order and each stage every micro-batch in
        turn, receiving from the previous stage's rank and sending to the next one's without waiting (with
        looped or V placement two ranks send to each other), so rank r computes micro-batch i while the
        next rank computes i − 1. Point to point, not the schedule's ``eval``: the
        zero-bubble V schedule runs its backward actions there too."""
        import torch.distributed as dist

        owner = {s: r for r in range(dist.get_world_size(self.group))
                 for s in rank_stages(self.schedule_name, r, self.pp, self.virtual)}
        mine = dict(zip(self.model.stage_ids, self.stages))
        n_stages, rank = len(self.model.bounds), dist.get_rank(self.group)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        self.global_tokens, self.aux_sum = 1.0, torch.zeros((), dtype=torch.float64, device=self.device)
        held = [b["input_ids"] for b in batches]  # each micro-batch's input to the stage about to run
        sends = []
        for s in sorted(mine):
            outs = []
            for i, batch in enumerate(batches):
                kwargs = {k: batch[k] for k in ("labels", "position_ids", "doc_ids") if batch.get(k) is not None}
                if s > 0 and owner[s - 1] != rank:
                    x = torch.empty(self._io(self.model.cfg, s, n_stages, *batch["input_ids"].shape)[0].shape,
                                    dtype=self.stream_dtype, device=self.device)
                    dist.recv(x, group=self.group, group_src=owner[s - 1])
                else:
                    x = held[i]
                y = mine[s].submod(x, **kwargs)
                if s == n_stages - 1:
                    total += y.sum().double()
                elif owner[s + 1] != rank:  # not waited on: the receiver may be sending to this rank first
                    sends.append(dist.isend(y.contiguous(), group=self.group, group_dst=owner[s + 1]))
                else:  # the next stage is this rank's too
                    outs.append(y)
            held = outs
        for work in sends:
            work.wait()
        return total


def build_pipeline_model(model: nn.Module, model_cfg: ModelConfig, mesh, p: ParallelConfig, seq_len: int,
                         cfg=None, hbm_bytes: Optional[float] = None
                         ) -> tuple[list[nn.Module], list[int], list[tuple[int, int]]]:
    """This rank's parts of ``model`` (a HybridLM on the meta device, left unchanged). ``cfg``: the run's
    config, whose micro-batches weigh each stage's memory in the split, on a GPU of ``hbm_bytes`` (None:
    its size unknown)."""
    import copy

    dims = mesh.dims
    cost = memory = None
    if cfg is not None and not model_cfg.stage_layers:
        from braid.plan.layout import layout_of
        from braid.plan.memory import SplitMemory
        from braid.plan.model_cost import layer_costs

        cost = layer_costs(model_cfg, seq_len)
        n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp)
        memory = SplitMemory(cfg, cost, layout_of(cfg, dims), n_micro, hbm_bytes, virtual_stages(p))
    bounds = stage_bounds(model_cfg, dims.pp * virtual_stages(p), seq_len, shared_state_cuts(model), cost, memory)
    stage_ids = rank_stages(p.pp_schedule, mesh.local_rank("pp"), dims.pp, virtual_stages(p))
    parts = [prune(copy.deepcopy(model), *bounds[s]) for s in stage_ids]
    return parts, stage_ids, bounds


__all__ = ["StageLayers", "balanced_cuts", "stage_bounds", "rank_stages", "stashed_micro_batches", "stage_sends",
           "describe_split", "prune", "PipelineModel", "PartOptimizers", "Pipeline", "build_pipeline_model",
           "SCHEDULES"]
