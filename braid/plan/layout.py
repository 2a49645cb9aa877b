"""A candidate layout: mesh sizes, cp kind, pipeline schedule, activation checkpointing and micro batch, and
how it is written into a config (so the real validation, ``braid.parallel.mesh.check_world``, judges it)."""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass

from braid.config import Config


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int
    cp_kind: str  # "-" when cp == 1
    ac: str  # none | full | every_<N>
    micro_batch: int
    pp: int = 1
    pp_schedule: str = "-"  # "-" when pp == 1

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def virtual(self) -> int:
        """Pipeline stages per pp rank: the schedule's own count (what :func:`apply_layout` asks for)."""
        from braid.config import ParallelConfig, virtual_stages

        return virtual_stages(ParallelConfig(pp=self.pp, pp_schedule=self.pp_schedule)) if self.pp > 1 else 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def recompute_fraction(self, n_layers: int) -> float:
        """Share of the blocks' forward run again in backward."""
        if self.ac == "none":
            return 0.0
        if self.ac == "full":
            return 1.0
        n = int(re.fullmatch(r"every_([1-9][0-9]*)", self.ac).group(1))
        return (n_layers // n) / n_layers

    def label(self) -> str:
        parts = [f"pp{self.pp}:{self.pp_schedule}"] if self.pp > 1 else []
        parts += [f"dpr{self.dp_replicate}", f"dps{self.dp_shard}"]
        if self.cp > 1:
            parts.append(f"cp{self.cp}:{self.cp_kind}")
        if self.tp > 1:
            parts.append(f"tp{self.tp}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        return " ".join(parts) + f" ac:{self.ac} mb{self.micro_batch}"

    def overrides(self) -> list[str]:
        """The ``key=value`` overrides that select this layout."""
        out = [f"parallel.dp_replicate={self.dp_replicate}", f"parallel.dp_shard={self.dp_shard}",
               f"parallel.cp={self.cp}", f"parallel.tp={self.tp}", f"parallel.ep={self.ep}",
               f"parallel.activation_checkpoint={self.ac}", f"train.micro_batch_size={self.micro_batch}"]
        if self.cp > 1:
            out.append(f"parallel.cp_kind={self.cp_kind}")
        out.append(f"parallel.pp={self.pp}")
        if self.pp > 1:  # with the schedule's own stages per rank
            out += [f"parallel.pp_schedule={self.pp_schedule}", "parallel.pp_virtual_stages=0"]
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def apply_layout(cfg: Config, lay: Layout, share: bool = False) -> Config:
    """A copy of ``cfg`` with the layout's keys set (``parallel.layout`` becomes manual). ``share``: copy only
    the sections the layout sets (``parallel``, ``train``) and share the others with ``cfg``, as the planner
    does for its thousands of candidates, which it only reads."""
    if share:
        out = copy.copy(cfg)
        out.parallel, out.train = copy.copy(cfg.parallel), copy.copy(cfg.train)
    else:
        out = copy.deepcopy(cfg)
    p = out.parallel
    p.dp, p.dp_replicate, p.dp_shard, p.cp, p.tp, p.ep = None, lay.dp_replicate, lay.dp_shard, lay.cp, lay.tp, lay.ep
    if lay.cp > 1:
        p.cp_kind = lay.cp_kind
    p.pp = lay.pp
    if lay.pp > 1:
        p.pp_schedule, p.pp_virtual_stages = lay.pp_schedule, 0
    p.activation_checkpoint = lay.ac
    p.layout = "manual"
    out.train.micro_batch_size = lay.micro_batch
    return out


def layout_of(cfg: Config, dims) -> Layout:
    """The layout of a run: its resolved mesh sizes (:class:`braid.parallel.mesh.ParallelDims`) and config."""
    p = cfg.parallel
    return Layout(dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.ep, p.cp_kind if dims.cp > 1 else "-",
                  p.activation_checkpoint, cfg.train.micro_batch_size, dims.pp, p.pp_schedule if dims.pp > 1 else "-")
