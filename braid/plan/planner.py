"""Enumerate the layouts of a config for N GPUs, keep those the real validation accepts and that fit, and
rank them by projected tokens/s per GPU."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from braid.config import Config
from braid.errors import ConfigError
from braid.plan.comm import Links
from braid.plan.cost import Projection, divisors, powers_of_two_upto, project
from braid.plan.hardware import GPU
from braid.plan.layout import Layout, apply_layout
from braid.plan.model_cost import ModelCost, layer_costs

ROOT = Path(__file__).resolve().parents[2]
EFFICIENCY = ROOT / "bench" / "results" / "efficiency.json"
AC_CHOICES = ("none", "every_2", "full")
MAX_MICRO_BATCH = 64


def load_efficiency(gpu: str, path: Optional[Path] = None) -> tuple[dict, float]:
    """(factors of ``gpu``, eager element-wise factor) from the efficiency file."""
    path = Path(path or EFFICIENCY)
    try:
        data = json.loads(path.read_text())
        return dict(data["gpus"][gpu]), float(data.get("eager_elementwise_factor", 2.0))
    except FileNotFoundError:
        raise ConfigError(f"efficiency file {path} does not exist (bench/results/efficiency.json ships with braid)")
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"efficiency file {path} has no valid entry for GPU kind {gpu!r} ({exc})")


def model_cost(cfg: Config) -> ModelCost:
    """Costs of the run's model at its sequence length (vocabulary resolved as the trainer does)."""
    from braid.data.tokenizer import load_tokenizer
    from braid.models.stats import resolve_vocab

    model = cfg.model
    if model.vocab_size is None:
        model = resolve_vocab(model, load_tokenizer(cfg.data.tokenizer).vocab_size)
    return layer_costs(model, cfg.data.seq_len)


def shape_problem(cfg: Config, cost: ModelCost, lay: Layout) -> Optional[str]:
    """Why the model's shapes cannot be split this way (what the TP/EP plans need), or None."""
    m = cfg.model
    for layer in cost.layers:
        if layer.heads and layer.heads % lay.tp:
            return f"{layer.heads} heads % tp {lay.tp}"
        if layer.kv_heads and layer.kv_heads % lay.tp:
            return f"{layer.kv_heads} kv heads % tp {lay.tp}"
        if lay.cp_kind == "ulysses" and layer.heads and (layer.heads // lay.tp) % lay.cp:
            return f"{layer.heads // lay.tp} heads per tp rank % cp {lay.cp} (ulysses)"
    if lay.tp > 1:
        hidden = [m.ffn_hidden] if m.ffn_hidden else []
        if "E" in m.ffn_pattern and m.moe.expert_hidden:
            hidden.append(m.moe.expert_hidden)
        if any(h % lay.tp for h in hidden) or cost.vocab % lay.tp or cost.d_model % lay.tp:
            return f"hidden sizes / vocab % tp {lay.tp}"
    if lay.ep > 1 and ("E" not in m.ffn_pattern or m.moe.n_experts % lay.ep):
        return f"experts % ep {lay.ep}"
    return None


def enumerate_layouts(cfg: Config, world: int, gpus_per_node: int, cost: Optional[ModelCost] = None):
    """Every layout for ``world`` GPUs that passes the config validation and ``check_world`` (see
    :func:`candidates`)."""
    return (lay for lay, _ in candidates(cfg, world, gpus_per_node, cost))


def candidates(cfg: Config, world: int, gpus_per_node: int, cost: Optional[ModelCost] = None):
    """``(layout, config with its keys)`` for every layout for ``world`` GPUs that the config validation
    (``braid.config.validate``, what ``load_config`` runs) and ``check_world`` accept and the model's
    shapes allow. The configs share their model and data sections with ``cfg``: read them, do not change
    them (:func:`braid.plan.layout.apply_layout` makes one to keep)."""
    from braid.config import validate
    from braid.parallel.mesh import check_world

    cost = cost or model_cost(cfg)
    deepspeed = cfg.parallel.engine == "deepspeed"
    has_moe = "E" in cfg.model.ffn_pattern
    kinds = ["ring", "ulysses", "tree"] + (["s2"] if cfg.model.s2.enabled else [])
    valid_meshes: set = set()
    valid_runs: set = set()
    for pp, schedule in pipelines(cfg, world, cost):
        for tp in divisors(world // pp):
            if tp > gpus_per_node or (deepspeed and tp > 1):
                continue
            for cp in divisors(world // (pp * tp)):
                if deepspeed and cp > 1:
                    continue
                rest = world // (pp * tp * cp)
                for dp_replicate in divisors(rest):
                    if deepspeed and dp_replicate > 1:
                        continue
                    dp_shard = rest // dp_replicate
                    eps = [e for e in divisors(dp_shard * cp) if e % cp == 0] if has_moe and not deepspeed else [1]
                    for ep, kind in itertools.product(eps, kinds if cp > 1 else ["-"]):
                        dp = dp_replicate * dp_shard
                        for mb in powers_of_two_upto(min(MAX_MICRO_BATCH, cfg.train.global_batch_size // dp or 1)):
                            for ac in AC_CHOICES:
                                lay = Layout(dp_replicate, dp_shard, cp, tp, ep, kind, ac, mb, pp, schedule)
                                if shape_problem(cfg, cost, lay):
                                    continue
                                try:
                                    candidate = apply_layout(cfg, lay, share=True)
                                    # validate's checks of the mesh keys and of (ac, micro batch) are
                                    # independent (parallel.dp is left unset), so each part is validated once;
                                    # check_world runs on every layout
                                    mesh_key, run_key = (pp, schedule, tp, cp, dp_replicate, ep, kind), (ac, mb)
                                    if mesh_key not in valid_meshes or run_key not in valid_runs:
                                        validate(candidate)
                                        valid_meshes.add(mesh_key)
                                        valid_runs.add(run_key)
                                    check_world(candidate, world)
                                except ConfigError:
                                    continue
                                yield lay, candidate


def pipelines(cfg: Config, world: int, cost: ModelCost) -> list[tuple[int, str]]:
    """``(pp, schedule)`` pairs to try: no pipeline, and every pp dividing ``world`` with each schedule whose
    stages (pp × the schedule's stages per rank) the layers can be cut into (``|`` marks: that count only).
    DeepSpeed runs without a pipeline."""
    from braid.config import ParallelConfig, virtual_stages
    from braid.parallel.pipeline import SCHEDULES

    out = [(1, "-")]
    if cfg.parallel.engine == "deepspeed":
        return out
    marked = len(cfg.model.stage_layers) + 1 if cfg.model.stage_layers else None
    for pp in divisors(world)[1:]:
        for schedule in SCHEDULES:
            n = pp * virtual_stages(ParallelConfig(pp=pp, pp_schedule=schedule))
            if n <= len(cost.layers) and marked in (None, n):
                out.append((pp, schedule))
    return out


@dataclass
class Plan:
    world: int
    gpu: GPU
    gpus_per_node: int
    candidates: int
    ranked: list[Projection]  # fitting layouts, best first
    unfit: list[Projection]  # the ones that do not fit, smallest peak memory first


def plan(cfg: Config, world: int, gpu: GPU, gpus_per_node: int = 8, efficiency: Optional[Path] = None) -> Plan:
    eff, eager = load_efficiency(gpu.name, efficiency)
    links = Links(gpu, gpus_per_node, eff["nvlink"], eff["ib"])
    cost = model_cost(cfg)
    cache: dict = {}
    fitting, unfit, n = [], [], 0
    for lay, lay_cfg in candidates(cfg, world, gpus_per_node, cost):
        n += 1
        proj = project(lay_cfg, cost, lay, links, eff, eager, cache)
        (fitting if proj.memory.fits else unfit).append(proj)
    # ties (same work per GPU) go to the simpler layout: less cp, tp and ep, fewer replicas
    fitting.sort(key=lambda p: (-round(p.tokens_per_s_per_gpu, 6), p.layout.cp, p.layout.tp, p.layout.ep,
                                p.layout.dp_replicate, AC_CHOICES.index(p.layout.ac)))
    unfit.sort(key=lambda p: p.memory.peak_bytes)
    return Plan(world, gpu, gpus_per_node, n, fitting, unfit)
