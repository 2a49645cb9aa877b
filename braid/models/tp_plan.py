"""Tensor-parallel plans as data: each module states, next to its class, how its parameters split
over tp ranks (``tp_plan(tp) -> TPPlan``); ``braid.parallel.tensor_parallel`` applies any plan the
same way and names no module class. Pure Python and plain torch (no torch.distributed).

The layout is Megatron's: projections into heads/channels split their output rows (``Rows`` or
``Split(0)``), output projections their input columns (``Split(1)``), per-head and per-channel
parameters follow their heads; an unlisted parameter is replicated (its gradient, partial on each
rank, is all-reduced over tp). Inside the module's forward every parameter reads as this rank's
local tensor, so a module infers its local head counts from shapes, never from attributes.

``Rows`` describes dim 0 as ``groups`` outer groups, each the concatenation of ``blocks``
(``Heads``: ``count`` units of ``rows`` rows). Rank r owns the r-th contiguous 1/tp of every block's
units (numbered across the groups), or, for a ``shared`` block with fewer units than ranks
(Megatron's KV replication, tp a multiple of n_kv_heads), the whole unit ``r // (tp / units)``. The
applier stores the weight as a plain ``Shard(0)`` when every rank's rows are its contiguous 1/tp;
else, with ``packed_output`` (a large packed Linear such as Hymba's ``[q|k|v|x|z]``), as ``Shard(0)``
with its output columns re-laid by one all-to-all; else replicated, each rank computing with its rows.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Union

import torch.nn as nn

from braid.errors import ConfigError


@dataclass(frozen=True)
class Split:
    """The parameter splits evenly over tp along ``dim``."""

    dim: int = 0


@dataclass(frozen=True)
class Heads:
    """A block of ``count`` units (heads, KV heads, channels) of ``rows`` rows each (per outer group);
    ``key`` names the config key of the unit count in errors; ``shared``: fewer units than ranks are
    replicated (rank r uses unit ``r // (tp / units)``)."""

    count: int
    rows: int
    key: str
    shared: bool = False


@dataclass(frozen=True)
class Rows:
    """Dim 0 of a parameter as ``groups`` × concatenation of ``blocks`` (see the module docstring);
    ``packed_output``: the owner is a Linear whose rows stay an even ``Shard(0)`` and whose output is
    re-laid per rank (``key`` names the size whose total rows must then divide by tp)."""

    blocks: tuple[Heads, ...]
    groups: int = 1
    packed_output: bool = False
    key: str = ""


@dataclass
class TPPlan:
    """How one module shards over tp.

    params: parameter name (relative to the module) → ``Split`` or ``Rows``; others replicate.
    checks: ``(value, config key)`` pairs that must divide by tp, checked first and in order.
    reduce_outputs: submodules whose output is a partial sum over tp that feeds sharded computation
        again (all-reduced forward and backward, e.g. a projection from split channels to a few).
    split_norms: RMSNorm submodule → the full channel count it normalises, where its channels are
        split over tp (the mean square is summed over ranks).
    at_rank: called once with ``(rank, tp)`` after sharding, for what depends on the rank (e.g. the
        global index of the first local head of S2's head-dependent pattern).
    plain: parameters left ordinary tensors: replicated computation whose gradient is already
        complete on every rank (e.g. a router that every rank runs alike), so never reduced.
    children: submodule → its own plan, applied first; its input arrives as it is and its partial
        output joins this module's before the one reduction.
    copy_outputs: submodules (identities) whose output, a replicated value, feeds sharded computation
        (``copy_to_region``: identity forward, all-reduce backward). For a module with
        ``replicated_input``, which places these copies itself.
    packed_outputs: submodule → block sizes of its output's last dim, which comes from a parameter
        split evenly along it; one all-to-all hands each rank its 1/tp of every block.
    replicated_input: the module's input enters as it is (with sequence parallelism: gathered for
        replicated use), not through ``copy_to_region``: some of its computation is replicated.
    """

    params: dict[str, Union[Split, Rows]] = field(default_factory=dict)
    checks: tuple[tuple[int, str], ...] = ()
    reduce_outputs: tuple[str, ...] = ()
    split_norms: dict[str, int] = field(default_factory=dict)
    at_rank: Optional[Callable[[int, int], None]] = None
    plain: tuple[str, ...] = ()
    children: dict[str, "TPPlan"] = field(default_factory=dict)
    copy_outputs: tuple[str, ...] = ()
    packed_outputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    replicated_input: bool = False


def divisible(value: int, tp: int, key: str) -> None:
    if value % tp:
        raise ConfigError(f"config key '{key}' = {value} must be divisible by parallel.tp = {tp}")


def owned_units(block: Heads, total: int, tp: int, rank: int) -> range:
    """The units (of ``total`` across groups) rank ``rank`` computes with."""
    if total % tp == 0:
        n = total // tp
        return range(rank * n, (rank + 1) * n)
    if block.shared and tp % total == 0:
        unit = rank // (tp // total)
        return range(unit, unit + 1)
    if block.shared:
        raise ConfigError(f"config key '{block.key}' = {total} must be divisible by parallel.tp = {tp} or divide "
                          f"it (KV heads are split or replicated over tp)")
    raise ConfigError(f"config key '{block.key}' = {total} must be divisible by parallel.tp = {tp}")


def rank_rows(rows: Rows, tp: int, rank: int) -> list[tuple[int, int]]:
    """Rank ``rank``'s rows of dim 0 as increasing ``(start, length)`` ranges (adjacent ones merged),
    in (group, block, unit) order: the local layout the module's forward sees."""
    group_rows = sum(b.count * b.rows for b in rows.blocks)
    owned = [owned_units(b, b.count * rows.groups, tp, rank) for b in rows.blocks]
    out: list[tuple[int, int]] = []
    for g in range(rows.groups):
        offset = g * group_rows
        for b, units in zip(rows.blocks, owned):
            for u in range(b.count):
                if g * b.count + u in units and b.rows:
                    start = offset + u * b.rows
                    if out and out[-1][0] + out[-1][1] == start:
                        out[-1] = (out[-1][0], out[-1][1] + b.rows)
                    else:
                        out.append((start, b.rows))
            offset += b.count * b.rows
    return out


def check_plan(plan: TPPlan, tp: int) -> None:
    """Every size error of ``plan`` at ``tp`` ranks, as a :class:`ConfigError` naming the key."""
    for value, key in plan.checks:
        divisible(value, tp, key)
    for child in plan.children.values():
        check_plan(child, tp)
    for spec in plan.params.values():
        if isinstance(spec, Rows):
            for b in spec.blocks:
                owned_units(b, b.count * spec.groups, tp, 0)
            if spec.packed_output:
                divisible(spec.groups * sum(b.count * b.rows for b in spec.blocks), tp, spec.key)




# ---------------------------------------------------------------------------- reset views

_RESET_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def set_reset_view(module: nn.Module, view: Callable[[nn.Module], ContextManager]) -> None:
    """Register ``view(module)``, a context manager under which ``module.reset_parameters()`` runs
    (tensor parallelism: on full-size copies of its sharded parameters)."""
    _RESET_VIEWS[module] = view


def reset_view(module: nn.Module) -> ContextManager:
    """The context ``module``'s own ``reset_parameters`` runs in (a no-op unless one is registered)."""
    view = _RESET_VIEWS.get(module)
    return contextlib.nullcontext() if view is None else view(module)


__all__ = ["TPPlan", "Split", "Rows", "Heads", "rank_rows", "check_plan", "divisible", "owned_units",
           "set_reset_view", "reset_view"]
