"""``parallel.layout=auto``: the trainer (and the launcher's ``--check-world-size``) replace the layout keys
by the planner's best fitting layout for the world size, before the mesh is built."""

from __future__ import annotations

import os
from typing import Optional

from braid.config import Config
from braid.errors import ConfigError

# CUDA device names → planner GPU kinds (first match wins)
_DEVICE_KINDS = (("H200", "h200"), ("H100", "h100-sxm"), ("H800", "h100-sxm"), ("B200", "b200"),
                 ("A100", "a100-80gb"), ("A800", "a100-80gb"))
FALLBACK_KIND = "h100-sxm"


def detect_gpu_kind(device=None) -> tuple[str, str]:
    """(kind, how it was chosen) for ``parallel.plan_gpu=auto``."""
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        for key, kind in _DEVICE_KINDS:
            if key in name:
                return kind, f"detected {name}"
        return FALLBACK_KIND, f"{name} unknown to the planner, planned as {FALLBACK_KIND}"
    return FALLBACK_KIND, f"no CUDA device, planned as {FALLBACK_KIND}"


def resolve_auto_layout(cfg: Config, world: int, device=None,
                        gpus_per_node: Optional[int] = None) -> tuple[Config, Optional[str]]:
    """``cfg`` with the best fitting layout's keys when ``parallel.layout=auto`` (and the banner note saying
    what was chosen), else ``cfg`` unchanged and None. Nothing fitting is one ConfigError line."""
    if cfg.parallel.layout != "auto":
        return cfg, None
    from braid.plan.__main__ import nothing_fits_line
    from braid.plan.hardware import gpu_kind
    from braid.plan.layout import apply_layout
    from braid.plan.planner import plan

    if cfg.parallel.plan_gpu == "auto":
        kind, how = detect_gpu_kind(device)
    else:
        kind, how = cfg.parallel.plan_gpu, "parallel.plan_gpu"
    per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or min(world, 8)
    memory = None
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        memory = torch.cuda.get_device_properties(device).total_memory  # fit what this device really has
    result = plan(cfg, world, gpu_kind(kind, memory_bytes=memory), per_node)
    if not result.ranked:
        raise ConfigError(f"parallel.layout=auto: {nothing_fits_line(result)}")
    best = result.ranked[0]
    note = (f"layout auto → {best.layout.label()} (planner, {kind}: {how}; {best.tokens_per_s_per_gpu:.0f} "
            f"tokens/s/GPU projected, {best.memory.peak_bytes / 2**30:.1f} GiB/GPU)")
    return apply_layout(cfg, best.layout), note
