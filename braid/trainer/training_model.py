"""The model as the training steps run it: built on the meta device, parallelised, given this rank's
shards of the initial weights and, under ``parallel.engine=deepspeed``, inside a DeepSpeed engine;
with its optimizer and how its gradients are scaled and reduced (:mod:`braid.trainer.engine`)."""

from __future__ import annotations

import copy
from typing import Optional

import torch

from braid.config import Config, ModelConfig, ParallelConfig
from braid.models.hybrid import HybridLM
from braid.parallel.fsdp import expert_sharded_params, grad_divide_factor, scalar_params
from braid.parallel.materialize import materialize
from braid.parallel.mesh import Mesh
from braid.parallel.parallelize import parallelize
from braid.trainer.engine import DeepSpeedEngine, FSDPEngine
from braid.trainer.optim import build_optimizer


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_parallel_model(model_cfg: ModelConfig, mesh: Mesh, p: ParallelConfig, device: torch.device,
                         param_dtype: Optional[torch.dtype], seed: int, seq_len: int = 0,
                         run_cfg: Optional[Config] = None) -> torch.nn.Module:
    """The meta-device lifecycle: build on the meta device (no memory), parallelize (TP → CP → EP → AC →
    compile → FSDP2), allocate this rank's shards on ``device`` and draw their initial values, which
    depend on ``seed`` and each parameter's name only (not on the layout). Under DeepSpeed ZeRO-3 the
    shards are DeepSpeed's partitions (:mod:`braid.parallel.zero3`), stored in ``param_dtype``. With
    ``parallel.pp > 1``, this rank's pipeline stages (:mod:`braid.parallel.pipeline`; ``seq_len`` weighs
    the balanced split, ``run_cfg`` its memory on this rank's GPU)."""
    with torch.device("meta"):
        model = HybridLM(model_cfg)
    template = copy.deepcopy(model)  # the unparallelised structure the init rules run on (stays on meta)
    if mesh.dims.pp > 1:  # this rank's stages, each a part of the model parallelised on its own
        from braid.parallel.pipeline import PipelineModel, build_pipeline_model

        hbm = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        parts, stage_ids, bounds = build_pipeline_model(model, model_cfg, mesh, p, seq_len, run_cfg, hbm)
        parts = [materialize(parallelize(part, mesh, p, device, param_dtype), template, device, seed)
                 for part in parts]
        return PipelineModel(parts, stage_ids, bounds)
    model = parallelize(model, mesh, p, device, param_dtype)
    if p.engine == "deepspeed" and p.zero_stage == 3:
        from braid.parallel.zero3 import partition_from_meta

        return partition_from_meta(model, template, device, seed, p, param_dtype)
    return materialize(model, template, device, seed)


def build_training_model(cfg: Config, model_cfg: ModelConfig, mesh: Mesh, device: torch.device,
                         dtype: Optional[torch.dtype], grad_accum: int) -> tuple[object, list[str]]:
    """The engine (:mod:`braid.trainer.engine`) holding the model and its optimizer, and what
    ``checkpoint.init_from`` did (lines for the log). Initial weights from ``cfg.train.seed`` (see
    :func:`build_parallel_model`)."""
    p, dims = cfg.parallel, mesh.dims
    # FSDP2 computes in bf16 on GPU only; DeepSpeed's bf16 (on CPU too) wants its ZeRO-3 partitions in it.
    param_dtype = dtype if device.type == "cuda" or p.engine == "deepspeed" else None
    model = build_parallel_model(model_cfg, mesh, p, device, param_dtype, cfg.train.seed, cfg.data.seq_len, cfg)
    from braid.convert.init_weights import init_from_config

    parts = getattr(model, "parts", [model])
    init_notes = [n for part in parts for n in init_from_config(part, cfg)]  # every layout loads its own part
    # After sharding: it must hold the sharded parameters. Under a pipeline one per part, as DCP's optimizer
    # state dict is per module.
    if hasattr(model, "parts"):
        from braid.parallel.pipeline import PartOptimizers

        optimizer = PartOptimizers([build_optimizer(part, cfg.train) for part in parts])
    else:
        optimizer = build_optimizer(model, cfg.train)
    if p.engine == "deepspeed":
        from braid.parallel.deepspeed_engine import build_engine, skip_non_finite_steps

        engine = build_engine(model, optimizer, cfg, dims.dp, grad_accum, bf16=dtype == torch.bfloat16)
        skip_non_finite_steps(optimizer, device)
        # DeepSpeed averages gradients over data-parallel ranks.
        return DeepSpeedEngine(engine, optimizer, float(dims.dp)), init_notes
    fsdp = mesh.fsdp_mesh() if p.engine == "fsdp" and dims.dp_cp > 1 else None
    manual_reductions: list = []
    if fsdp is not None:
        experts, scalars = expert_sharded_params(model), scalar_params(model)
        if experts:  # replicas of the same experts: dp_replicate × dp_shard / (ep / cp)
            replicas = mesh.sub("dp_mod_ep")
            manual_reductions.append((experts, replicas.get_group() if replicas.size() > 1 else None))
        if scalars:  # summed like the losses, over data × context ranks
            manual_reductions.append((scalars, mesh.group("dp_cp")))
    # FSDP2 averages over its mesh: undo it. The gradient norm spans the pipeline's stages.
    return FSDPEngine(model, optimizer, grad_divide_factor(fsdp), manual_reductions, cfg.train.grad_clip,
                      norm_group=mesh.group("pp") if dims.pp > 1 else None), init_notes
