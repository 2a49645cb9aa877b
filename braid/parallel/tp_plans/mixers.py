"""The tensor-parallel plan of a module: what its class declares (``tp_plan(tp)``, data types in
:mod:`braid.models.tp_plan`), checked against the tp size. No module class is named here: a mixer or
FFN states its own plan next to its code."""

from __future__ import annotations

import torch.nn as nn

from braid.errors import ConfigError
from braid.models.tp_plan import TPPlan, check_plan


def module_plan(module: nn.Module, tp: int) -> TPPlan:
    """``module``'s declared plan for ``tp`` ranks, its sizes checked (a :class:`ConfigError` names the
    key); a module without a declaration is an error naming its class."""
    declare = getattr(module, "tp_plan", None)
    if declare is None:
        raise ConfigError(f"config key 'parallel.tp' = {tp}: no tensor-parallel plan for "
                          f"{type(module).__name__} (declare tp_plan(tp) on its class, see braid/models/tp_plan.py)")
    plan = declare(tp)
    check_plan(plan, tp)
    return plan


# Mixers and FFNs declare alike; the two names say what the caller holds.
mixer_plan = ffn_plan = module_plan

__all__ = ["module_plan", "mixer_plan", "ffn_plan"]
