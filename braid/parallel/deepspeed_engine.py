"""``parallel.engine=deepspeed``: ZeRO stage 1/2/3 (optional CPU offload) behind braid's trainer.

The DeepSpeed config is generated from ours: micro batch, gradient accumulation (Megatron
semantics), clipping, bf16 on GPU. The optimizer is braid's own AdamW (same parameter groups) passed
as a client optimizer, so no fused/CPU Adam extension is built, and the learning rate comes from
``braid.trainer.schedule.lr_at`` each step (DeepSpeed's scheduler is not used).

On CPU DeepSpeed needs its CPU accelerator: ``DS_ACCELERATOR=cpu`` is set before the first import
(when no CUDA device is present). Its first use on a machine JIT-builds a small shared-memory comm
extension (about a minute, cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from braid.config import Config, ParallelConfig
from braid.errors import CheckpointError, ConfigError

TAG = "deepspeed"  # the sub-directory of a step_<N> checkpoint that DeepSpeed writes


def import_deepspeed():
    """Import DeepSpeed lazily (it is slow to import and only this engine needs it)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def zero_section(p: ParallelConfig) -> dict:
    """The ``zero_optimization`` section of the DeepSpeed config: stage and offload."""
    zero: dict = {"stage": p.zero_stage}
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return zero


def ds_config(cfg: Config, dp: int, grad_accum: int, bf16: bool) -> dict:
    """The DeepSpeed JSON config equivalent of ours for ``dp`` data-parallel ranks."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(t.grad_clip),  # 0 disables, as ours
        "zero_optimization": zero_section(cfg.parallel),
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "zero_force_ds_cpu_optimizer": False,  # ... also with optimizer offload
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def check_flattenable(model: nn.Module) -> None:
    """ZeRO flattens every parameter through a byte view, which 0-d tensors do not allow."""
    from braid.parallel.zero3 import full_shape

    scalars = [n for n, p in model.named_parameters() if len(full_shape(p)) == 0]
    if scalars:
        raise ConfigError(f"config key 'parallel.engine' = 'deepspeed' cannot flatten 0-d parameters "
                          f"({scalars[0]}, ...); use parallel.engine=fsdp")


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, dp: int, grad_accum: int,
                 bf16: bool):
    """Wrap ``model``/``optimizer`` in a DeepSpeed engine (needs an initialised process group)."""
    check_flattenable(model)
    deepspeed = import_deepspeed()
    if cfg.parallel.zero_stage == 3 and getattr(model, "lm_head", True) is None:
        # Tied head: the root's forward reads embed.weight after the embedding's own forward, so
        # ZeRO-3 must gather it for the root too (it would be released after the embedding).
        deepspeed.zero.register_external_parameter(model, model.embed.weight)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(cfg, dp, grad_accum, bf16),
                                           dist_init_required=False)
    return engine


def save(engine, directory: str, trainer_state: dict) -> None:
    """Collective: DeepSpeed's own per-rank files under ``directory/deepspeed``, trainer state inside."""
    engine.save_checkpoint(directory, tag=TAG, client_state={"braid_trainer": trainer_state}, save_latest=False)


def checkpoint_globals() -> list:
    """What DeepSpeed's ZeRO-1/2/3 files name besides tensors and containers (its loss scaler, stage
    enum and fragment map: plain data), the allow-list its files are loaded with."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load(engine, directory: str) -> dict:
    """Collective: restore model, ZeRO optimizer partitions; returns the trainer state.

    DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs whatever a file
    names; every file it reads here goes through ``weights_only=True`` with :func:`checkpoint_globals`
    instead (a refused file raises ``UnsafeCheckpointFile`` naming it)."""
    from braid.trainer.safe_load import load_weights_only

    allowed = checkpoint_globals()
    reader = engine.checkpoint_engine
    reader.load = lambda path, map_location=None: load_weights_only(path, allowed, map_location)
    try:
        path, client = engine.load_checkpoint(directory, tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    finally:
        del reader.load  # the instance attribute shadowed the class's method
    if path is None or "braid_trainer" not in (client or {}):
        raise CheckpointError(f"checkpoint '{directory}' holds no DeepSpeed state this run can load")
    return client["braid_trainer"]


def skip_non_finite_steps(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Megatron semantics under DeepSpeed: an iteration whose gradients are non-finite on any rank
    leaves the weights and the optimizer state alone (in fp32/bf16 DeepSpeed itself would apply it).

    DeepSpeed calls the client optimizer's ``step()`` on every rank, with this rank's (partitioned,
    clipped) fp32 gradients attached, so the check wraps that call; the ranks agree by an all-reduce.
    ``optimizer.skipped_last`` says whether the last step was skipped."""
    from braid.parallel.distributed import any_rank

    step = optimizer.step

    def guarded_step(*args, **kwargs):
        # One flag per gradient, read back once: a bool() per tensor would sync the GPU each time.
        flags = [torch.isfinite(p.grad).all() for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        bad = bool(flags) and not bool(torch.stack([f.to(device) for f in flags]).all())
        optimizer.skipped_last = any_rank(bad, device)
        return None if optimizer.skipped_last else step(*args, **kwargs)

    optimizer.skipped_last = False
    optimizer.step = guarded_step


def global_grad_norm(engine) -> Optional[float]:
    """The pre-clipping gradient norm DeepSpeed computed in its last optimizer step."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


__all__ = ["check_flattenable", "zero_section", "ds_config", "build_engine", "save", "load", "checkpoint_globals",
           "global_grad_norm", "import_deepspeed", "skip_non_finite_steps"]
