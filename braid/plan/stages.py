"""Which layers each pipeline rank of a layout runs, how many micro-batches of them it holds at once, and the
bubble its schedule leaves: what the projection and the memory estimate need of ``parallel.pp``.

The split is the trainer's own (:func:`braid.parallel.pipeline.stage_bounds`: the ``|`` marks or the balanced
forward FLOPs and memory), and so is the depth of each schedule's warm-up
(:func:`braid.parallel.pipeline.stashed_micro_batches`). Bubbles, with ``t`` the slowest rank's time for one
micro-batch (all its stages, forward and backward) and ``p`` stage ranks:

- gpipe and 1F1B: ``(p − 1)·t`` — Narayanan et al. 2021, the fraction ``(p − 1)/(m + p − 1)`` of a step of
  ``m`` micro-batches;
- interleaved 1F1B with ``v`` stages per rank: ``(p − 1)·t / v``;
- zero-bubble V (Qi et al. 2024, two stages per rank): ``(p − 1)·(T_F + T_B − 2·T_W)`` for one chunk, whose
  forward, input-gradient and weight-gradient passes cost ``T_F``, ``T_B`` and ``T_W``. A GEMM's backward is
  half input and half weight gradient, so GEMMs leave no bubble; attention, KDA/SSM scans and element-wise
  work have no weights (their backward is all ``T_B``), and a recomputed forward joins ``T_B``: the bubble
  is ``(p − 1)/v`` × (3 × the rank's weightless forward + its recomputed forward) per micro-batch
  (:func:`braid.plan.cost._layer_times`), 0 only for a model of GEMMs without checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

from braid.config import Config
from braid.plan.layout import Layout
from braid.plan.model_cost import ModelCost


@dataclass(frozen=True)
class RankPart:
    """What one pp rank holds."""

    rank: int
    stages: tuple  # ((stage index, first layer, end), ...) in the rank's order
    stash: dict  # stage index → micro-batches held at the schedule's deepest moment
    first: bool  # holds the embedding
    last: bool  # holds the final norm, head and loss

    @property
    def layers(self) -> list[int]:
        return [i for _, lo, hi in self.stages for i in range(lo, hi)]


def checkpointed(lay: Layout, part: RankPart) -> set[int]:
    """Model-wide indices of the layers activation checkpointing recomputes on this rank: ``every_<N>``
    counts within each stage, as the trainer applies it to each stage's part."""
    if lay.ac == "none":
        return set()
    from braid.parallel.activation_checkpoint import checkpointed_layers

    return {lo + j for _, lo, hi in part.stages for j in checkpointed_layers(lay.ac, hi - lo)}


def rank_parts(cfg: Config, cost: ModelCost, lay: Layout, n_micro: int, cache: dict | None = None,
               hbm_bytes: float | None = None) -> list[RankPart]:
    """Every pp rank's part of ``lay`` (one rank holding the whole model without a pipeline), split as the
    trainer splits it on a GPU of ``hbm_bytes``."""
    n = len(cost.layers)
    if lay.pp == 1:
        return [RankPart(0, ((0, 0, n),), {0: 1}, True, True)]
    from braid.parallel.pipeline import rank_stages, stage_bounds, stashed_micro_batches
    from braid.plan.memory import SplitMemory

    v = lay.virtual
    cache = {} if cache is None else cache
    key = ("stage_bounds", lay, n_micro, hbm_bytes)
    if key not in cache:
        memory = SplitMemory(cfg, cost, lay, n_micro, hbm_bytes)
        cache[key] = stage_bounds(cfg.model, lay.pp * v, cfg.data.seq_len, cost.fixed_cuts, cost, memory)
    bounds = cache[key]
    out = []
    for r in range(lay.pp):
        ids = rank_stages(lay.pp_schedule, r, lay.pp, v)
        out.append(RankPart(r, tuple((s, *bounds[s]) for s in ids),
                            stashed_micro_batches(lay.pp_schedule, r, lay.pp, v, n_micro),
                            0 in ids, len(bounds) - 1 in ids))
    return out


def bubble_seconds(lay: Layout, micro_batch_s: float, zero_bubble_excess_s: float) -> float:
    """The schedule's idle time per step (module docstring); ``micro_batch_s``: the slowest rank's time for
    one micro-batch; ``zero_bubble_excess_s``: its ``T_F + T_B − 2·T_W`` summed over its stages."""
    if lay.pp == 1:
        return 0.0
    if lay.pp_schedule in ("gpipe", "1f1b"):
        return (lay.pp - 1) * micro_batch_s
    v = lay.virtual
    if lay.pp_schedule == "interleaved_1f1b":
        return (lay.pp - 1) * micro_batch_s / v
    return (lay.pp - 1) * min(zero_bubble_excess_s, micro_batch_s) / v
