"""Activation checkpointing of whole blocks (``parallel.activation_checkpoint``) and per-block compile.

``none``: keep every activation. ``full``: every block recomputes its forward in backward.
``every_<N>``: blocks ``N-1, 2N-1, ...`` (every N-th) recompute, the others keep activations.
Non-reentrant ``torch.utils.checkpoint``: it composes with FSDP2/DTensor and lets gradients enter
a checkpointed block through side outputs (K/V a mixer shares with later layers reach them that way).
"""

from __future__ import annotations

import contextlib
import logging
import re

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from braid.errors import ConfigError

log = logging.getLogger(__name__)


def checkpointed_layers(spec: str, n_layers: int) -> list[int]:
    """Indices of the blocks that recompute under ``spec`` (none | full | every_<N>)."""
    if spec == "none":
        return []
    if spec == "full":
        return list(range(n_layers))
    m = re.fullmatch(r"every_([1-9][0-9]*)", spec)
    if m is None:
        raise ConfigError(f"config key 'parallel.activation_checkpoint' = {spec!r} is invalid: none | full | every_<N>")
    n = int(m.group(1))
    return [i for i in range(n_layers) if (i + 1) % n == 0]


@contextlib.contextmanager
def _restore_counters(block: nn.Module):
    """The recompute must not count MoE loads twice: restore the counting buffers afterwards."""
    saved = [(buf, buf.clone()) for name, buf in block.named_buffers()
             if name.endswith(("load_counts", "drop_counts"))]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def checkpoint_block(block: nn.Module) -> nn.Module:
    """Wrap ``block`` so its forward is recomputed in backward.

    torch's checkpoint wrapper strips its prefix from state-dict keys (and DCP's FQNs), so
    checkpoints load with or without activation checkpointing.
    """
    return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True,
                              context_fn=lambda: (contextlib.nullcontext(), _restore_counters(block)))


def apply_activation_checkpoint(layers: nn.ModuleList, spec: str) -> list[int]:
    """Replace the selected blocks of ``layers`` in place; returns their indices."""
    chosen = checkpointed_layers(spec, len(layers))
    for i in chosen:
        layers[i] = checkpoint_block(layers[i])
    return chosen


def apply_compile(layers: nn.ModuleList, device: torch.device) -> bool:
    """``torch.compile`` each block on GPU; on CPU log and skip (compile times dominate tiny CPU runs)."""
    if device.type != "cuda":
        log.warning("braid: parallel.compile=true ignored on %s (per-block compile runs on GPU only)", device.type)
        return False
    for block in layers:
        block.compile()  # in place (nn.Module.compile): parameter names and checkpoints unchanged
    return True


__all__ = ["checkpointed_layers", "checkpoint_block", "apply_activation_checkpoint", "apply_compile"]
