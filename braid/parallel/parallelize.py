"""The one entry point that turns a built HybridLM into its parallel form, in torchtitan's order:

    tensor parallel → expert parallel → activation checkpointing → per-block compile → FSDP2

TP first because it replaces parameters with DTensors that FSDP2 then shards further; AC before
compile so the compiled region is the checkpointed block; FSDP2 last so it wraps the final modules.
The DeepSpeed engine (``parallel.engine=deepspeed``) takes over from FSDP2 in
:mod:`braid.parallel.deepspeed_engine`; the steps before it are shared.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

import torch
import torch.nn as nn

from braid.config import ParallelConfig
from braid.errors import ConfigError
from braid.parallel.activation_checkpoint import apply_activation_checkpoint, apply_compile
from braid.parallel.fsdp import apply_fsdp, expert_sharded_params, scalar_params
from braid.parallel.mesh import Mesh, ParallelDims, check_layout  # noqa: F401  check_layout: re-exported

log = logging.getLogger(__name__)

# Parameter attributes that the optimizer's grouping reads; sharding replaces the Parameter objects.
_PARAM_TAGS = ("_no_weight_decay",)
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _lazy(module: str, fn: str, key: str):
    """A function of a parallelism that may not be built yet; a clear one-line error if absent."""
    try:
        return getattr(importlib.import_module(module), fn)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise ConfigError(f"config key '{key}' > 1 is not available yet") from None


def _cp_ranks_per_node(d: ParallelDims) -> Optional[int]:
    """Context-parallel ranks that share a node (tree attention reduces inside a node first), or None
    when the whole cp group is on one node. cp ranks are adjacent except for the tp ranks between them."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) // d.tp
    return per_node if 1 <= per_node < d.cp else None


def parallelize(model: nn.Module, mesh: Mesh, p: ParallelConfig, device: torch.device,
                param_dtype: Optional[torch.dtype]) -> nn.Module:
    """Apply the layout to ``model`` (a HybridLM on ``device``) in place and return it.

    ``param_dtype``: FSDP2's compute dtype (bf16 on GPU) or None. With ``engine=deepspeed`` FSDP2
    is skipped: :func:`braid.parallel.deepspeed_engine.build_engine` wraps the result.
    """
    check_layout(p, mesh.dims)
    tags = {name: {t: getattr(prm, t) for t in _PARAM_TAGS if hasattr(prm, t)}
            for name, prm in model.named_parameters()}
    d = mesh.dims
    if d.tp > 1:
        apply_tp = _lazy("braid.parallel.tensor_parallel", "apply_tp", "parallel.tp")
        apply_tp(model, mesh.sub("tp"), p.sequence_parallel)
    if d.cp > 1:
        from braid.parallel.context import apply_cp, resolve_layout

        apply_cp(model, mesh.group("cp"), p.cp_kind, resolve_layout(p.cp_layout, model.cfg.pattern),
                 node_size=_cp_ranks_per_node(d))
    if d.ep > 1:
        apply_ep = _lazy("braid.parallel.expert_parallel", "apply_ep", "parallel.ep")
        apply_ep(model, mesh.sub("ep"))
    chosen = apply_activation_checkpoint(model.layers, p.activation_checkpoint)
    if chosen:
        log.info("braid: activation checkpointing of blocks %s", chosen)
    if p.compile:
        apply_compile(model.layers, device)
    if p.engine == "fsdp" and d.dp_cp > 1:
        apply_fsdp(model, mesh.fsdp_mesh(), param_dtype,
                   ignored=set(expert_sharded_params(model)) | set(scalar_params(model)))
    for name, prm in model.named_parameters():  # restore the tags on the new (sharded) Parameters
        for tag, value in tags.get(_clean(name), {}).items():
            setattr(prm, tag, value)
    return model


__all__ = ["parallelize", "check_layout"]
