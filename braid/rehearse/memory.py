"""Memory of one rehearsed rank: exact bytes of its local shards, and the peaks torch's memory tracker sees.

The tracker (``torch.distributed._tools``: ``FSDPMemTracker`` under FSDP2, ``MemTracker`` otherwise) follows
every tensor storage the step creates, fake ones included, by category (parameters, gradients, optimizer
state, activations, temporaries, FSDP's all-gather and reduce-scatter buffers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

# Tracker categories (their ``.value``) → the consumer an out-of-memory line names.
CONSUMERS = {
    "Sharded Param": "parameters", "Parameter": "parameters", "Buffer": "parameters",
    "Unsharded Param": "gathered parameters", "All Gather": "gathered parameters",
    "Sharded Grad": "gradients", "Unsharded Grad": "gradients", "Gradient": "gradients",
    "Reduce Scatter": "gradients",
    "OptState": "optimizer", "Optstate": "optimizer",
    "Activation": "activations", "Temp": "activations", "Inputs": "activations", "Other": "activations",
}


def local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def params_bytes(model: nn.Module) -> int:
    return sum(local_bytes(p) for p in unique_params(model))


def expert_params_bytes(model: nn.Module) -> int:
    """Bytes of the routed experts' stacked weights (``MoE.gate_up``/``down``) on this rank."""
    from braid.models.moe import MoE

    return sum(local_bytes(getattr(m, name)) for m in model.modules() if isinstance(m, MoE)
               for name in ("gate_up", "down"))


def grads_bytes(model: nn.Module) -> int:
    return sum(local_bytes(p.grad) for p in unique_params(model) if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Every tensor of the optimizer state: AdamW's two moments and its per-parameter step counter."""
    return sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def tracker(model: nn.Module, optimizers: list):
    """A memory tracker that also keeps the largest activation footprint seen at any moment (the tracker's own
    peak snapshot is taken at the peak total, which may fall in the optimizer step, after activations are freed).
    FSDP2's tracker for one FSDP module (and its one optimizer), torch's generic one for several parts."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from torch.distributed.fsdp import FSDPModule

    fsdp = isinstance(model, FSDPModule) and len(optimizers) == 1
    base, kinds = (FSDPMemTracker, _FSDPRefType) if fsdp else (MemTracker, _MemRefType)

    class Tracker(base):
        activations_peak = 0
        # Off once backward is done: clipping and the optimizer step allocate outside any module, which the
        # tracker files as activations, and there (on DTensor gradients) at the global shape, not the local.
        in_step = False

        def _update_peak_stats(self, peak_state) -> None:
            # The rank's peak only: torch's own version also updates every tracked module's peak, a loop over
            # all modules at every allocation (a fifth of a real-size rehearsal), which nothing here reads.
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)
                act = snap.get(kinds.ACT, 0)
                if not self.in_step and act > self.activations_peak:
                    self.activations_peak = act

    if base is FSDPMemTracker:
        t = Tracker(model, optimizers[0])
        t.track_inputs(())
        # FSDP2 leaves the ep-sharded experts (and 0-d parameters) alone, so its tracker would not see them.
        from braid.parallel.fsdp import expert_sharded_params, scalar_params

        for p in expert_sharded_params(model) + scalar_params(model):
            t._update_and_maybe_create_winfos(p.to_local() if isinstance(p, DTensor) else p, kinds.SHARDED_PARAM)
            # Their gradients are made in backward as any temporary is: file each as a gradient once accumulated.
            p.register_post_accumulate_grad_hook(lambda q: _file_as_gradient(t, q, kinds.SHARDED_GRAD))
    else:
        t = Tracker()
        t.track_external(model, *optimizers)
    return t


def forget_modules(t, module: nn.Module) -> None:
    """Drop the tracker's per-module stats of ``module`` (``reset_mod_stats`` for one part): a pipeline stage
    runs forward for several micro-batches before their backwards, which the trackers refuse otherwise. The
    memory accounting (live tensors, peaks) is not per module and stays."""
    for m in module.modules():
        t.memory_tracking.pop(m, None)


def _file_as_gradient(t, p: torch.Tensor, kind) -> None:
    t._update_and_maybe_create_winfos(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad, kind)


def peak_breakdown(t) -> tuple[int, dict[str, int]]:
    """Total bytes at the peak and what they were, by consumer."""
    snaps = t.get_tracker_snapshot("peak")
    if not snaps:
        return 0, {}
    snap = max(snaps.values(), key=lambda s: s.get("Total", 0))
    by: dict[str, int] = {}
    for key, value in snap.items():
        name = getattr(key, "value", None)
        if name is not None and value:
            consumer = CONSUMERS.get(name, "activations")
            by[consumer] = by.get(consumer, 0) + value
    return snap.get("Total", 0), by
