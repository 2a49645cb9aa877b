"""What the trainer asks of a parallel engine (``parallel.engine``): FSDP2 or DeepSpeed.

The trainer runs one loop for both; the differences live here. An engine holds the module that
forward goes through, the optimizer, and how a step happens:

* ``backward(objective)``: gradients of the (globally normalised) objective for one micro-batch;
* ``after_micro_batch()``: DeepSpeed clips, steps and zeroes at its last micro-batch inside its own
  ``step()``; FSDP2 does nothing here;
* ``step(loss)``: the optimizer step unless the loss or gradients are non-finite (Megatron: the
  iteration counts, the update is skipped); returns ``(grad_norm before clipping, updated)``;
* ``zero_grad()``; ``save(directory, trainer_state)`` / ``load(directory, trainer_state)`` through the
  checkpoint manager, which keeps what is common (markers, checksums, RNG files).

FSDP2 reduce-scatters gradients on every micro-batch (no ``no_sync``: see braid.parallel.fsdp), so
accumulation is only the summing of micro-batch gradients, the same for both engines.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from braid.parallel.data_parallel import unwrap
from braid.parallel.fsdp import clip_grad_norm, reduce_manual_grads


class FSDPEngine:
    """FSDP2 (and the single-process run): braid's own clipping, skipping and optimizer step."""

    name = "fsdp"
    single_process_group = False  # init_distributed: the run's mesh decides the groups
    steps_in_micro_batch = False  # nothing to do after each micro-batch's backward

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_factor: float,
                 manual_reductions: list, grad_clip: float, norm_group=None):
        self.model, self.optimizer = model, optimizer
        self.loss_factor = loss_factor  # undoes FSDP2's averaging of gradients over its mesh
        self.manual_reductions = manual_reductions  # (parameters, group) FSDP2 does not reduce
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.norm_group = norm_group  # pipeline stages: each rank holds some layers' gradients

    @property
    def module(self) -> torch.nn.Module:
        """The HybridLM itself (for its attributes: context parallelism, MoE layers)."""
        return unwrap(self.model)

    def layout(self, parallel) -> dict:
        return {"engine": self.name}

    def backward(self, objective: torch.Tensor) -> None:
        (objective * self.loss_factor).backward()

    def after_micro_batch(self) -> None:
        pass

    def step(self, loss: float) -> tuple[float, bool]:
        for params, group in self.manual_reductions:
            reduce_manual_grads(params, group, self.loss_factor)
        grad_norm = clip_grad_norm(self.model.parameters(), self.max_norm, self.norm_group)
        updated = math.isfinite(loss) and math.isfinite(grad_norm)
        if updated:
            self.optimizer.step()
        return grad_norm, updated

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedEngine:
    """ZeRO 1/2/3 through a DeepSpeed engine that clips, steps and zeroes its own (partitioned) state."""

    name = "deepspeed"
    single_process_group = True  # DeepSpeed builds its groups from the one default group
    steps_in_micro_batch = True  # its step() runs after every micro-batch (acting at the last one)

    def __init__(self, engine, optimizer: torch.optim.Optimizer, loss_factor: float):
        self.model, self.optimizer = engine, optimizer
        self.loss_factor = loss_factor  # DeepSpeed averages gradients over the data-parallel ranks

    @property
    def module(self) -> torch.nn.Module:
        return unwrap(self.model)

    def layout(self, parallel) -> dict:
        return {"engine": self.name, "zero_stage": parallel.zero_stage}

    def backward(self, objective: torch.Tensor) -> None:
        # The objective is already normalised by the global token count: no 1/accumulation.
        self.model.backward(objective * self.loss_factor, scale_wrt_gas=False)

    def after_micro_batch(self) -> None:
        self.model.step()  # steps (clip, AdamW, zero grads) at the last micro-batch only

    def step(self, loss: float) -> tuple[float, bool]:
        from braid.parallel.deepspeed_engine import global_grad_norm

        grad_norm: Optional[float] = global_grad_norm(self.model)
        # DeepSpeed skips by itself where it checks for overflow (fp16; fp32 with clipping), not in bf16:
        # then the guard on its client optimizer does (deepspeed_engine.skip_non_finite_steps).
        updated = math.isfinite(loss) and self.model.was_step_applied() and not self.optimizer.skipped_last
        self.optimizer.skipped_last = False
        return (float("nan") if grad_norm is None else grad_norm), updated

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes its partitioned gradients in its step()


ENGINES = {cls.name: cls for cls in (FSDPEngine, DeepSpeedEngine)}


def engine_class(name: str):
    return ENGINES[name]


__all__ = ["FSDPEngine", "DeepSpeedEngine", "engine_class", "ENGINES"]
