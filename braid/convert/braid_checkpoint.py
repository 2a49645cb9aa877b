"""Read a braid run's DCP checkpoint into a plain single-process model, and write one back.

DCP stores tensors under their fully qualified names whatever the parallel layout (DDP, FSDP2 shards,
...), so a freshly built unsharded ``HybridLM`` can load any checkpoint without a process group.
Reading trusts none of its files (README, Security): the files read are checked against the sizes
and checksums of the ``COMPLETE`` manifest first, and DCP's pickles go through
:mod:`braid.trainer.safe_load`; anything wrong is a one-line ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp

from braid.config import Config, ModelConfig, load_config
from braid.errors import CheckpointError
from braid.trainer import checksums
from braid.trainer.checkpoint import MARKER, read_marker
from braid.trainer.checkpoint_config import config_path, describe
from braid.trainer.checkpoint_layout import checkpoint_problem
from braid.trainer.safe_load import METADATA, dcp_load, read_dcp_metadata
from braid.trainer.safe_pickle import UnsafeCheckpointFile


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """``<run>/checkpoints/step_N``, ``<run>/checkpoints/latest`` (the pointer file), the
    ``checkpoints`` dir or the run dir → the checkpoint directory to read."""
    p = Path(path)
    if p.name == "latest" and p.is_file():
        p = p.parent / p.read_text().strip()
    elif (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.is_dir() and not (p / ".metadata").is_file() and (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / ".metadata").is_file():
        raise CheckpointError(f"'{path}' is not a braid DCP checkpoint (no .metadata under {p})")
    if not (p / MARKER).is_file():
        raise CheckpointError(f"checkpoint '{p}' is incomplete (no {MARKER} marker); refusing to read it")
    return p


def run_config(ckpt_dir: Path) -> Config:
    """The config the checkpoint was trained with: ``step_N/config.yaml``, or for checkpoints written
    before checkpoints carried one, ``<run.dir>/config.yaml`` two levels above ``step_N``."""
    cfg_path = config_path(ckpt_dir)
    if cfg_path is None:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' has no config.yaml, nor has its run dir "
                              f"'{ckpt_dir.parent.parent}'")
    return load_config(cfg_path)


def _verified(ckpt_dir: Path, names: Optional[list[str]] = None) -> None:
    """Sizes and DCP metadata (cheap), then the checksums of ``names`` (default: every file)."""
    problem = checkpoint_problem(ckpt_dir)
    if problem is None:
        problem = checksums.mismatch(ckpt_dir, read_marker(ckpt_dir).get("checksums") or {}, names)
    if problem:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' is damaged: {problem}")


def read_checkpoint_metadata(ckpt_dir: Path):
    """The DCP ``Metadata`` of a checkpoint, verified and read without running code from it."""
    _verified(ckpt_dir, [METADATA])
    try:
        return read_dcp_metadata(ckpt_dir)
    except UnsafeCheckpointFile as exc:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' is damaged: {exc}") from None


def _saved_vocab(ckpt_dir: Path) -> Optional[int]:
    meta = read_checkpoint_metadata(ckpt_dir)
    entry = meta.state_dict_metadata.get("model.embed.weight")
    return None if entry is None else int(entry.size[0])


def model_config_for(ckpt_dir: Path, cfg: Config) -> ModelConfig:
    """The model section with ``vocab_size`` resolved from the saved embedding's shape."""
    mcfg = copy.deepcopy(cfg.model)
    if mcfg.vocab_size is None:
        mcfg.vocab_size = _saved_vocab(ckpt_dir)
    if mcfg.vocab_size is None:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' has no model.embed.weight")
    return mcfg


def load_state_dict_into(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Fill ``model`` from the ``model`` entry of a DCP checkpoint, in place. A parallelised model
    (FSDP2/TP/EP DTensors) reads only its own shards: no rank holds the whole model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    meta = read_checkpoint_metadata(ckpt_dir)
    # Only the shards holding weights are read (and so verified), not the RNG or trainer-only files.
    shards = {info.relative_path for index, info in (meta.storage_data or {}).items() if index.fqn.startswith("model.")}
    _verified(ckpt_dir, sorted(shards))
    from braid.parallel.zero3 import is_partitioned

    if any(is_partitioned(p) for p in model.parameters()):
        _load_into_partitions(model, ckpt_dir, meta.state_dict_metadata)
        return
    state = {"model": get_model_state_dict(model)}
    _read(state, ckpt_dir)
    set_model_state_dict(model, state["model"])


def _read(state: dict, ckpt_dir: Path) -> None:
    # no_dist: this process reads alone, also inside a process group (rank 0 exporting at the end of
    # training, every rank reading checkpoint.init_from) — a collective load would wait for the others.
    try:
        dcp_load(state, ckpt_dir, no_dist=True)
    except UnsafeCheckpointFile as exc:
        raise CheckpointError(f"checkpoint '{ckpt_dir}' is damaged: {exc}") from None


def _load_into_partitions(model: torch.nn.Module, ckpt_dir: Path, saved: dict) -> None:
    """A DeepSpeed ZeRO-3 model (no DCP layout of its own): one full tensor is read at a time and each
    rank keeps its partition of it, so no rank holds the whole model."""
    from braid.parallel.materialize import fill_local, plain_name

    def full(name: str, _) -> torch.Tensor:
        entry = saved[f"model.{name}"]
        value = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        _read({"model": {name: value}}, ckpt_dir)
        return value

    fill_local(model, full)
    buffers = {plain_name(n): b for n, b in model.named_buffers() if f"model.{plain_name(n)}" in saved}
    if buffers:
        _read({"model": buffers}, ckpt_dir)


def load_braid_checkpoint(path: str | Path):
    """Checkpoint dir (``latest`` accepted) → ``(HybridLM in eval mode, fp32, CPU; Config)``."""
    from braid.models.hybrid import HybridLM

    ckpt = resolve_checkpoint_dir(path)
    cfg = run_config(ckpt)
    mcfg = model_config_for(ckpt, cfg)
    cfg.model = mcfg
    model = HybridLM(mcfg).float()
    load_state_dict_into(model, ckpt)
    return model.eval(), cfg


def save_braid_checkpoint(model: torch.nn.Module, cfg: Config, run_dir: str | Path, step: int = 0) -> Path:
    """Write ``<run_dir>/config.yaml`` and ``checkpoints/step_<step>`` (model weights only, DCP, with
    the completion marker and the ``latest`` pointer) so that a run can start from it.

    A run resuming from it (``checkpoint.resume=<path>``) gets the weights; optimizer and trainer
    state are absent, so the trainer must start them fresh (see the conversion notes in the report).
    """
    import json
    import time

    from braid.config import to_yaml

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / f"step_{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save({"model": sd}, checkpoint_id=str(ckpt))
    for name, text in describe(cfg, step, 0, 0, {"engine": "fsdp", "world_size": 1}).items():
        (ckpt / name).write_text(text)
    files = checksums.files_of(ckpt)
    meta = {"step": step, "world_size": 1, "time": time.time(),
            "files": {n: (ckpt / n).stat().st_size for n in files},
            "checksums": {n: checksums.file_checksum(ckpt / n) for n in files}}
    (ckpt / MARKER).write_text(json.dumps(meta) + "\n")
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return ckpt
