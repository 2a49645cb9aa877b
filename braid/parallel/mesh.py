"""The parallel layout: sizes from the config, checked against the world size, and the DeviceMesh.

Mesh dims, outermost first: ``pp`` (pipeline stages, only when > 1), ``dp_replicate`` (HSDP replicas),
``dp_shard`` (FSDP2 shards), ``cp``
(context), ``tp`` (tensor). Flattened views, as torchtitan names them:

- ``dp``          = dp_replicate × dp_shard: ranks that read different samples (data loading);
- ``dp_shard_cp`` = dp_shard × cp: ranks a parameter is sharded over by FSDP2;
- ``dp_cp``       = dp_replicate × dp_shard × cp: ranks whose losses and token counts are summed
  (tensor ranks hold the same loss, so they are left out).

With ``ep > 1`` the ``dp_shard`` dim is split into ``dp_shard_mod_ep`` × ``dp_shard_in_ep``; the ``ep`` view is
``dp_shard_in_ep × cp`` (experts sharded over data/context ranks, torchtitan-style) and
``dp_mod_ep`` = ``dp_replicate × dp_shard_mod_ep`` holds the replicas of the same experts.
The mesh is passed around; nothing here is global state.

Everything but :func:`build_mesh` is config arithmetic without torch, so a launcher can check a layout
for its world size (``python -m braid.train --check-world-size N``) before it spawns a single rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from braid.config import Config, ParallelConfig
from braid.errors import ConfigError
from braid.models.registry import mixer_declaration

if TYPE_CHECKING:  # torch only in annotations: the layout checks must stay cheap to import
    import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """Resolved sizes; ``pp · dp_replicate · dp_shard · cp · tp == world``."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int
    world: int
    pp: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel size: the number of distinct sample streams."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp


def resolve_dims(p: ParallelConfig, world: int) -> ParallelDims:
    """Sizes from ``parallel.*`` for ``world`` ranks; one-line ConfigError naming the key otherwise.

    ``parallel.dp`` is the spine's key: the data-parallel size. It is accepted as an alias when it
    agrees with ``dp_replicate × dp_shard`` (and alone, with the others unset, it sets ``dp_shard``).
    """
    pp = p.pp
    rest = pp * p.dp_replicate * p.cp * p.tp
    if p.dp_shard is None:
        if world % rest:
            raise ConfigError(f"config key 'parallel.pp' × 'parallel.dp_replicate' × 'parallel.cp' × 'parallel.tp' "
                              f"= {rest} does not divide the world size {world}")
        dp_shard = world // rest
    else:
        dp_shard = p.dp_shard
    product = pp * p.dp_replicate * dp_shard * p.cp * p.tp
    if product != world:
        raise ConfigError(f"config keys 'parallel.pp' × 'parallel.dp_replicate' × 'parallel.dp_shard' × "
                          f"'parallel.cp' × 'parallel.tp' = {pp}×{p.dp_replicate}×{dp_shard}×{p.cp}×{p.tp} = "
                          f"{product} must equal the world size {world}")
    if p.dp is not None and p.dp != p.dp_replicate * dp_shard:
        raise ConfigError(f"config key 'parallel.dp' = {p.dp} contradicts parallel.dp_replicate × "
                          f"parallel.dp_shard = {p.dp_replicate * dp_shard} (world size {world})")
    if p.ep > 1:
        if p.ep % p.cp or dp_shard % (p.ep // p.cp):
            raise ConfigError(f"config key 'parallel.ep' = {p.ep} must be a multiple of parallel.cp = {p.cp} "
                              f"and ep / cp must divide parallel.dp_shard = {dp_shard}")
    return ParallelDims(p.dp_replicate, dp_shard, p.cp, p.tp, p.ep, world, pp)


def check_layout(p: ParallelConfig, d: ParallelDims) -> None:
    """Combinations this build cannot run, each a one-line ConfigError naming the key."""
    if p.engine == "deepspeed" and (d.tp > 1 or d.cp > 1 or d.ep > 1):
        raise ConfigError("config key 'parallel.engine' = 'deepspeed' runs data parallelism only "
                          "(parallel.tp, parallel.cp and parallel.ep must be 1)")
    if p.engine == "deepspeed" and d.dp_replicate > 1:
        raise ConfigError("config key 'parallel.dp_replicate' must be 1 with parallel.engine=deepspeed "
                          "(ZeRO partitions over all data-parallel ranks; use parallel.dp_shard)")
    if p.engine == "deepspeed" and d.pp > 1:
        raise ConfigError("config key 'parallel.pp' must be 1 with parallel.engine=deepspeed "
                          "(braid pipelines through torch.distributed.pipelining under parallel.engine=fsdp)")
    if p.cpu_offload and p.engine != "deepspeed":
        raise ConfigError("config key 'parallel.cpu_offload' needs parallel.engine=deepspeed")


def resolve_layout(spec: str, pattern: str) -> str:
    """``parallel.cp_layout``: ``auto`` is zigzag (balances causal softmax) unless no mixer of the pattern
    calls attention (its declared ``cp_ops``): then the work per token does not grow along the sequence,
    contiguous shards are balanced and need one state hand-off per rank instead of two."""
    if spec != "auto":
        return spec
    softmax = any("attention" in mixer_declaration(ch, "cp_ops") for ch in set(pattern))
    return "zigzag" if softmax else "contiguous"


def layout_pieces(layout: str, cp: int) -> int:
    """How many equal pieces the sequence is cut into (data.seq_len must be a multiple)."""
    return 2 * cp if layout == "zigzag" else cp


def check_cp(cfg: Config, cp: int) -> None:
    """What context parallelism needs of the config, each a one-line ConfigError naming the key."""
    p = cfg.parallel
    pieces = layout_pieces(resolve_layout(p.cp_layout, cfg.model.pattern), cp)
    if cfg.data.seq_len % pieces:
        raise ConfigError(f"config key 'data.seq_len' = {cfg.data.seq_len} must be a multiple of {pieces} "
                          f"with parallel.cp = {cp} ({p.cp_layout} layout)")
    if p.cp_kind == "ulysses" and cfg.model.n_heads % cp:
        raise ConfigError(f"config key 'model.n_heads' = {cfg.model.n_heads} must be divisible by "
                          f"parallel.cp = {cp} with parallel.cp_kind=ulysses")


def check_world(cfg: Config, world: int) -> ParallelDims:
    """Every check of the layout and batch that needs only the config and the world size; the trainer runs
    it on every rank and launch/torchrun.sh once before spawning them, so both fail with the same line."""
    dims = resolve_dims(cfg.parallel, world)
    check_layout(cfg.parallel, dims)
    if dims.cp > 1:
        check_cp(cfg, dims.cp)
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dims.dp):
        raise ConfigError(
            f"config key 'train.global_batch_size' = {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size × data-parallel size = {t.micro_batch_size * dims.dp}"
        )
    if dims.pp > 1:
        check_pp(cfg, dims)
    return dims


def check_pp(cfg: Config, dims: ParallelDims) -> None:
    """The pipeline's micro-batches are the gradient-accumulation micro-batches (Megatron): the schedules
    need at least one per stage rank, and the interleaved ones a whole number of rounds."""
    t, p = cfg.train, cfg.parallel
    n_micro = t.global_batch_size // (t.micro_batch_size * dims.dp)
    need = dims.pp if p.pp_schedule != "gpipe" else 1
    if n_micro < need or (p.pp_schedule == "interleaved_1f1b" and n_micro % dims.pp):
        what = "a multiple of" if p.pp_schedule == "interleaved_1f1b" else "at least"
        raise ConfigError(f"config key 'train.global_batch_size' = {t.global_batch_size} gives {n_micro} micro-batches "
                          f"per pipeline (global / (micro_batch_size × dp)); parallel.pp_schedule="
                          f"{p.pp_schedule} needs {what} parallel.pp = {dims.pp}")


@dataclass
class Mesh:
    """The DeviceMesh of a layout (None for one process) and the views the trainer needs."""

    dims: ParallelDims
    device_mesh: Optional[object]  # torch.distributed.device_mesh.DeviceMesh
    flattened: Optional[dict] = None  # name → flattened DeviceMesh (kept: slicing them is deprecated)

    def sub(self, name: str):
        """A named (possibly flattened) 1-D sub-mesh, or None on one process."""
        if self.device_mesh is None:
            return None
        return (self.flattened or {}).get(name) or self.device_mesh[name]

    def group(self, name: str) -> Optional[dist.ProcessGroup]:
        """The process group of a 1-D view (``dp``, ``dp_cp``, ``tp``, ...); None on one process."""
        sub = self.sub(name)
        return None if sub is None else sub.get_group()

    def local_rank(self, name: str) -> int:
        sub = self.sub(name)
        return 0 if sub is None else sub.get_local_rank()

    @property
    def dp_rank(self) -> int:
        """Which of the ``dims.dp`` sample streams this rank reads."""
        return self.local_rank("dp")

    def fsdp_mesh(self):
        """The mesh FSDP2 shards over: ``(dp_replicate, dp_shard_cp)`` for HSDP, else ``dp_shard_cp``."""
        if self.device_mesh is None:
            return None
        shard = "dp_shard" if self.dims.cp == 1 and self.dims.ep == 1 else "dp_shard_cp"
        if self.dims.dp_replicate > 1:
            return self.device_mesh["dp_replicate", shard]
        return self.sub(shard)


def build_mesh(dims: ParallelDims, device_type: str) -> Mesh:
    """Create the DeviceMesh (every rank calls it; needs an initialised process group if world > 1)."""
    if dims.world == 1:
        return Mesh(dims, None)
    from torch.distributed.device_mesh import init_device_mesh

    if dims.ep > 1:
        in_ep = dims.ep // dims.cp
        names = ["dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp"]
        shape = [dims.dp_replicate, dims.dp_shard // in_ep, in_ep, dims.cp, dims.tp]
        shard_dims = ("dp_shard_mod_ep", "dp_shard_in_ep")
    else:
        names = ["dp_replicate", "dp_shard", "cp", "tp"]
        shape = [dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp]
        shard_dims = ("dp_shard",)
    if dims.pp > 1:  # outermost: stage ranks are the farthest apart (point-to-point, once per micro-batch)
        names, shape = ["pp", *names], [dims.pp, *shape]
    mesh = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))
    flat = {}
    if dims.ep > 1:
        flat["dp_shard"] = mesh[shard_dims]._flatten("dp_shard")
        flat["ep"] = mesh["dp_shard_in_ep", "cp"]._flatten("ep")
        # Ranks holding the same experts: their expert gradients are summed over this view.
        flat["dp_mod_ep"] = mesh["dp_replicate", "dp_shard_mod_ep"]._flatten("dp_mod_ep")
    flat["dp"] = mesh[("dp_replicate", *shard_dims)]._flatten("dp")
    flat["dp_shard_cp"] = mesh[(*shard_dims, "cp")]._flatten("dp_shard_cp")
    flat["dp_cp"] = mesh[("dp_replicate", *shard_dims, "cp")]._flatten("dp_cp")
    return Mesh(dims, mesh, flat)


def mesh_summary(dims: ParallelDims) -> str:
    """``dp_replicate 1 × dp_shard 2 × cp 1 × tp 1`` for the banner and error messages."""
    return ((f"pp {dims.pp} × " if dims.pp > 1 else "")
            + f"dp_replicate {dims.dp_replicate} × dp_shard {dims.dp_shard} × cp {dims.cp} × tp {dims.tp}"
            + (f" (ep {dims.ep})" if dims.ep > 1 else ""))


__all__ = ["ParallelDims", "Mesh", "resolve_dims", "check_layout", "resolve_layout", "layout_pieces", "check_cp",
           "check_pp", "check_world", "build_mesh", "mesh_summary"]
