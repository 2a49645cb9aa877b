"""Memory per GPU of a layout, in closed form. This is the one seam where the rehearsal of the real-sizes
issue (``python -m braid.rehearse``, the real build and step under fake tensors) can replace the estimate:
:func:`estimate_memory` is the only function the planner calls for memory.

Model states (FSDP2 with a bf16 compute policy, AdamW): every parameter has an fp32 master copy, an fp32
gradient and two fp32 moments, 16 bytes, sharded over tp × dp_shard × cp (experts over ep × tp and the
rest of dp_shard × cp, which is the same count); dp_replicate keeps copies. DeepSpeed ZeRO-1 shards the
moments only, ZeRO-2 also the gradients, ZeRO-3 everything; ``cpu_offload`` moves the optimizer states
off the GPU. FSDP2 adds the unsharded bf16 parameters of two blocks (the one running and the one
prefetched) and one block's unsharded fp32 gradient before its reduce-scatter.

Activations per layer and token: the bf16 tensors each op keeps for backward, counted as Korthikanti et
al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1-2) do; for a GPT block
with dropout their count is 34·h bytes per token (s·b·h·34 + 5·a·s²·b). The flash-style attention kernels
keep no s×s scores, so the 5·a·s/h term is absent here; dropout is not used. The delta-rule mixers (K,
D) are counted tensor by tensor as their Triton path saves them
(:func:`braid.plan.model_cost.delta_rule_width`, measured in tests/test_plan_activations.py). With tp and sequence
parallelism every tensor is split by tp (without it, the norms' inputs are not); cp splits the tokens.
``full`` checkpointing keeps only each block's input (2·h bytes per token) plus one block's activations
while it recomputes; ``every_<N>`` keeps full activations of the other blocks. The LM head adds its bf16
logits and fp32 copy for the loss (6 bytes × vocab/tp per token).

Under a pipeline each pp rank counts its own stages' parameters (the embedding on the first, the head on
the last) and keeps, per stage, as many micro-batches of activations as its schedule holds at once
(:func:`braid.parallel.pipeline.stashed_micro_batches`: 1F1B ``pp − rank``, gpipe all of them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from braid.config import Config
from braid.plan.layout import Layout
from braid.plan.model_cost import ModelCost

RESERVE_FRACTION = 0.08  # CUDA context, NCCL buffers, allocator fragmentation
RESERVE_BYTES = 2 * 2**30


@dataclass
class Memory:
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    buffers_bytes: float  # FSDP unsharded blocks
    activations_bytes: float
    peak_bytes: float
    usable_bytes: float

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def usable(hbm_bytes: float) -> float:
    return hbm_bytes * (1 - RESERVE_FRACTION) - RESERVE_BYTES


def _activations(cfg: Config, cost: ModelCost, lay: Layout) -> tuple[list[float], float, float]:
    """(bytes each layer keeps for one micro batch, bytes a checkpointed layer keeps (its input), the LM
    head's logits bytes) on one GPU."""
    tokens = lay.micro_batch * cfg.data.seq_len / lay.cp
    sp = cfg.parallel.sequence_parallel and lay.tp > 1

    def layer_bytes(layer) -> float:
        inner = (layer.act_width - layer.norm_width) / lay.tp
        norms = layer.norm_width / (lay.tp if sp else 1)
        return 2 * tokens * (inner + norms)

    return ([layer_bytes(layer) for layer in cost.layers], 2 * tokens * cost.d_model / (lay.tp if sp else 1),
            6 * tokens * cost.vocab / lay.tp)


def activation_bytes(cfg: Config, cost: ModelCost, lay: Layout, part=None) -> float:
    """Peak activation bytes on one GPU: one micro batch, or under a pipeline the micro-batches each of the
    rank's stages holds at its schedule's deepest moment (``part``: a :class:`braid.plan.stages.RankPart`)."""
    from braid.plan.stages import checkpointed, rank_parts

    part = part or rank_parts(cfg, cost, lay, 1)[0]
    acts, block_input, logits = _activations(cfg, cost, lay)
    recomputed = checkpointed(lay, part)
    kept = 0.0
    for s, lo, hi in part.stages:
        kept += part.stash[s] * sum(block_input if i in recomputed else acts[i] for i in range(lo, hi))
    working = max(acts[i] for i in part.layers) if recomputed else 0.0
    last_stage = part.stages[-1][0] if part.last else None
    return kept + working + (logits * part.stash[last_stage] if part.last else 0.0)


def _state_bytes(lay: Layout) -> tuple[float, float]:
    """FSDP2's bytes per parameter on one GPU (fp32 master, gradient and two moments, sharded), and per
    parameter of its largest block (the unsharded bf16 copies of two blocks and one fp32 gradient)."""
    shard = lay.tp * lay.dp_shard * lay.cp
    return 16 / shard, ((2 * 2 + 4) / lay.tp if lay.dp_shard * lay.cp > 1 else 0.0)


class SplitMemory:
    """What the pipeline split (:func:`braid.parallel.pipeline.balanced_cuts`) weighs a stage's bytes by:
    this module's closed form for one stage of ``lay`` under FSDP2 (pp refuses DeepSpeed) — its layers'
    model states, the activations of as many micro-batches as its schedule holds at once (checkpointed
    layers keep their input, plus one layer's while it recomputes), the FSDP2 buffers of its largest layer,
    the embedding on the first stage and the head and logits on the last. ``usable``: the bytes a GPU
    offers (None: unknown), of which a rank holding ``v`` stages gives each ``1/v``. Every candidate stage
    at once: :meth:`stage_matrix`."""

    def __init__(self, cfg: Config, cost: ModelCost, lay: Layout, n_micro: int, hbm_bytes=None, virtual=None):
        import numpy as np

        from braid.parallel.pipeline import stashed_micro_batches

        self.cost = cost
        acts, block_input, self.logits = _activations(cfg, cost, lay)
        per_param, per_block_param = _state_bytes(lay)
        virtual = virtual or lay.virtual  # a run's parallel.pp_virtual_stages, else the schedule's
        self.stash = {}
        for r in range(lay.pp):
            self.stash.update(stashed_micro_batches(lay.pp_schedule, r, lay.pp, virtual, n_micro))
        self.limit = usable(hbm_bytes) / virtual if hbm_bytes else None
        self.first = per_param * cost.first_params
        self.last = per_param * cost.last_params
        n = len(cost.layers)
        acts = np.asarray(acts, dtype=np.float64)
        params = np.asarray([x.params for x in cost.layers], dtype=np.float64)

        def spans(x: np.ndarray) -> np.ndarray:  # [j, i]: the sum of x over layers [j, i)
            c = np.concatenate([[0.0], np.cumsum(x)])
            return c[None, :] - c[:, None]

        def range_max(x: np.ndarray) -> np.ndarray:  # [j, i]: the max of x over layers [j, i) (0 when empty)
            out = np.zeros((n + 1, n + 1))
            for j in range(n):
                out[j, j + 1:] = np.maximum.accumulate(x[j:])
            return out

        self.states = per_param * spans(params) + per_block_param * range_max(params)
        kept = spans(acts)
        if lay.ac == "full":  # every layer keeps its input only
            kept = spans(np.full(n, block_input))
        elif lay.ac != "none":  # every_<N>: the N-th, 2N-th, ... layer of each stage keeps its input only
            every = int(lay.ac.removeprefix("every_"))
            saved = acts - block_input
            for j in range(n):
                at = np.arange(j + every - 1, n, every)
                steps = np.zeros(n + 1)
                steps[at + 1] = saved[at]
                kept[j] -= np.cumsum(steps)
        # One layer's activations while it recomputes, in a stage where some layer does.
        length = np.arange(n + 1)[None, :] - np.arange(n + 1)[:, None]
        shortest = {"none": n + 1, "full": 1}.get(lay.ac) or int(lay.ac.removeprefix("every_"))
        self.working = np.where(length >= shortest, range_max(acts), 0.0)
        self.kept = kept

    def stage_matrix(self, stage: int, n_stages: int):
        """``[n + 1, n + 1]`` bytes of stage ``stage`` holding layers ``[j, i)`` at ``[j, i]`` (j < i)."""
        stash = self.stash[stage]
        out = self.states + stash * self.kept + self.working
        if stage == 0:
            out = out + self.first
        if stage == n_stages - 1:
            out = out + self.last + stash * self.logits
        return out

    def stage_bytes(self, stage: int, lo: int, hi: int, n_stages: int) -> float:
        return float(self.stage_matrix(stage, n_stages)[lo, hi])

    def fits(self, nbytes):
        """Whether ``nbytes`` (a number or an array of them) fit the stage's share of the GPU."""
        return nbytes <= self.limit if self.limit is not None else nbytes == nbytes


def estimate_memory(cfg: Config, cost: ModelCost, lay: Layout, hbm_bytes: float, part=None) -> Memory:
    """Bytes per GPU of ``lay`` for ``cfg`` (``part``: the pp rank's, when pipelined). The rehearsal can
    stand in for this function."""
    from braid.plan.cost import rank_params

    p = cfg.parallel
    shard = lay.tp * lay.dp_shard * lay.cp
    n = rank_params(cost, part)[0] if part is not None else cost.params
    largest = max(cost.layers[i].params for i in part.layers) if part is not None else cost.largest_layer_params
    if p.engine == "deepspeed":
        dp = lay.dp
        stage = p.zero_stage
        params = 4 * n / (dp if stage >= 3 else 1)
        grads = 4 * n / (dp if stage >= 2 else 1)
        optimizer = 0.0 if p.cpu_offload else 8 * n / dp
        buffers = 2 * 2 * largest if stage >= 3 else 0.0
    else:
        params, grads, optimizer = 4 * n / shard, 4 * n / shard, 8 * n / shard
        buffers = 0.0
        if lay.dp_shard * lay.cp > 1:
            block = largest / lay.tp
            buffers = 2 * 2 * block + 4 * block
    acts = activation_bytes(cfg, cost, lay, part)
    peak = params + grads + optimizer + buffers + acts
    return Memory(params, grads, optimizer, buffers, acts, peak, usable(hbm_bytes))
