"""DCP checkpoints that are complete or invisible.

Layout under ``<run.dir>/checkpoints/``:
    step_<N>/            DCP shards of model + optimizer + trainer state, ``rng_rank<r>.pt``, and
                         the completion marker ``COMPLETE`` (JSON: step, world size, time, layout,
                         ``files``: the size of every file, and ``checksums``: the xxh3-64 of every
                         file, so damage is found before loading);
                         with parallel.engine=deepspeed, DeepSpeed's own ZeRO files under
                         ``deepspeed/`` instead of the DCP shards (trainer state inside them)
    latest               text file naming the newest complete ``step_<N>``
    step_<N>.damaged/    a complete checkpoint that failed to load, set aside by ``resume=auto``
    .step_<N>.tmp/       a save in progress (or killed); never read, removed by the next save
    .step_<N>.old/       a checkpoint being deleted (pruned or replaced); never read

A save writes into the temporary directory, adds the marker, then renames it into place; a run
killed at any moment therefore leaves either the whole checkpoint or nothing ``resume`` would pick.
Deletion renames first for the same reason: a half-deleted checkpoint is never visible.

Loading trusts no file of the checkpoint (README, Security): sizes and checksums are verified first
(``checkpoint.verify``), DCP metadata and values go through :mod:`braid.trainer.safe_load`, and the RNG
files hold only tensors and numbers, read with ``weights_only=True``.

DCP checkpoints hold every tensor by its fully qualified name with its global shape (FSDP2 and TP
parameters are DTensors), so they load under any other FSDP/HSDP/TP layout (resharding). DeepSpeed
checkpoints hold per-rank ZeRO partitions and load under the same engine and world size only; any
other mismatch is a one-line CheckpointError.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from braid.errors import CheckpointError
from braid.parallel.distributed import DistInfo, any_rank, barrier
from braid.trainer import checksums
from braid.trainer.checkpoint_layout import MARKER, checkpoint_dirs, checkpoint_problem, complete_checkpoints
from braid.trainer.safe_load import dcp_load, legacy_rng_globals, load_weights_only
from braid.trainer.safe_pickle import UnsafeCheckpointFile


class DamagedCheckpoint(CheckpointError):
    """A complete checkpoint whose files cannot be read back (``resume=auto`` falls back past it)."""


# The optimizer state by parameter name (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``): what a pipeline
# stage's own part of the checkpoint is, whatever stages saved it. Markers without it: torch's nested form.
OPTIM_FLAT = "flat"


def _parts(model: nn.Module, optimizer) -> list[tuple[nn.Module, Any]]:
    """(module, optimizer) pairs whose state dicts make up the checkpoint: the pipeline's parts, or one."""
    if hasattr(model, "parts"):
        return list(zip(model.parts, optimizer.optimizers))
    return [(model, optimizer)]


def _state_dicts(model: nn.Module, optimizer, flat: bool) -> list[tuple[dict, dict]]:
    options = StateDictOptions(flatten_optimizer_state_dict=flat)
    return [get_state_dict(m, o, options=options) for m, o in _parts(model, optimizer)]


def _merged(dicts: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    return ({k: v for m, _ in dicts for k, v in m.items()}, {k: v for _, o in dicts for k, v in o.items()})



def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}


def _remove(path: Path) -> None:
    """Delete a directory so that no half-deleted state is ever visible under its name."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint (by step, not by the ``latest`` pointer, which may lag a crash)."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints, floats and lists only, so it loads with ``weights_only=True``
    (numpy's and Python's states convert losslessly: 32-bit words, a position, a cached float)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    else:  # written before RNG files held only tensors and numbers
        np.random.set_state(n)
        random.setstate(p)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_file(path: Path) -> dict[str, Any]:
    """An ``rng_rank<r>.pt``, with ``weights_only=True``; older files also name numpy's array rebuild."""
    try:
        return load_weights_only(path)
    except UnsafeCheckpointFile:
        return load_weights_only(path, legacy_rng_globals())


def read_marker(path: Path) -> dict:
    """The JSON of a complete checkpoint's marker (older markers may lack ``layout``)."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def check_layout(path: Path, saved: Optional[dict], current: dict) -> None:
    """Refuse, in one line, a checkpoint the current layout cannot load."""
    saved = saved or {"engine": "fsdp"}  # markers before layouts were recorded: DCP checkpoints
    engine = current.get("engine", "fsdp")
    if saved.get("engine", "fsdp") != engine:
        raise CheckpointError(f"checkpoint '{path}' was saved with parallel.engine={saved.get('engine')}, "
                              f"this run uses parallel.engine={engine}; it cannot be loaded")
    if engine == "deepspeed":
        for key in ("world_size", "zero_stage"):
            if saved.get(key) != current.get(key):
                raise CheckpointError(f"checkpoint '{path}' holds DeepSpeed ZeRO partitions for {key}="
                                      f"{saved.get(key)}, this run has {key}={current.get(key)}; "
                                      "DeepSpeed checkpoints resume on the same layout only")


class CheckpointManager:
    """Saves and loads ``step_<N>`` checkpoints; ``layout`` (engine, sizes) is recorded in the marker."""

    def __init__(self, root: Path, keep: int, info: DistInfo, layout: Optional[dict] = None, verify: bool = True):
        self.root, self.keep, self.info = Path(root), keep, info
        self.layout = dict(layout or {"engine": "fsdp", "world_size": info.world_size})
        if not self.deepspeed:
            self.layout["optim_state"] = OPTIM_FLAT
        self.verify = verify  # checkpoint.verify: compare every file with its checksum before loading

    @property
    def deepspeed(self) -> bool:
        return self.layout.get("engine") == "deepspeed"

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             about: Optional[dict[str, str]] = None) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint directory.

        ``model`` is the trained module (plain, FSDP2-sharded, or a DeepSpeed engine); ``about``: files
        (name -> text) describing the checkpoint (checkpoint_config.describe), listed in the marker too.
        """
        final = self.root / f"step_{step}"
        tmp = self.root / f".step_{step}.tmp"
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in list(self.root.glob(".step_*.tmp")) + list(self.root.glob(".step_*.old")):
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed save or deletion
            tmp.mkdir()
        barrier()
        if self.deepspeed:
            from braid.parallel import deepspeed_engine

            deepspeed_engine.save(model, str(tmp), trainer_state)
        else:
            model_sd, optim_sd = _merged(_state_dicts(model, optimizer, flat=True))
            with warnings.catch_warnings():  # DCP warns that a lone process saves without a process group
                warnings.filterwarnings("ignore", message=".*assuming the intent is to")
                dcp.save({"model": model_sd, "optim": optim_sd, "trainer": trainer_state}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{self.info.rank}.pt")
        barrier()
        sums = checksums.gather_checksums(tmp, self.info.rank, self.info.world_size)
        if self.info.is_main:
            for name, text in (about or {}).items():
                (tmp / name).write_text(text)
            meta = {"step": step, "world_size": self.info.world_size, "time": time.time(), "layout": self.layout,
                    "files": _file_sizes(tmp), "checksums": checksums.complete_checksums(tmp, sums)}
            _fsync_write(tmp / MARKER, json.dumps(meta) + "\n")
            _fsync_dir(tmp)
            _remove(final)  # the same step saved again after a resume: replace it
            os.rename(tmp, final)
            _fsync_dir(self.root)
            _fsync_write(self.root / "latest", final.name + "\n")
            self._prune(step)
        barrier()
        return final

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` up to ``step``. Newer ones exist after a resume from an older checkpoint;
        counting them would delete what was just saved (leaving ``latest`` naming nothing); they are
        replaced one by one as the run passes them."""
        upto = [path for s, path in complete_checkpoints(self.root) if s <= step]
        for path in upto[: -self.keep]:
            _remove(path)

    def set_aside(self, path: Path) -> Path:
        """Rename a damaged checkpoint out of resume's and pruning's sight (kept for inspection)."""
        aside = Path(path).with_name(Path(path).name + ".damaged")
        if self.info.is_main:
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(path, aside)
            _fsync_dir(self.root)
        barrier()
        return aside

    def load_newest(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict) -> tuple[Optional[Path], Optional[dict], list[str]]:
        """Collective ``resume=auto``: load the newest complete checkpoint that loads.

        Returns ``(path, trainer state, warnings)``, ``(None, None, [])`` when there is none. Damaged
        newer checkpoints are set aside, one warning line each. If none loads, nothing is moved and the
        newest one's error is raised: a changed model fails every checkpoint alike, which is not damage.
        """
        failures: list[tuple[Path, str]] = []
        complete = complete_checkpoints(self.root)
        newest = complete[-1][0] if complete else -1
        incomplete = [p for s, p in checkpoint_dirs(self.root) if s > newest and not is_complete(p)]
        for _, path in reversed(complete):
            state, error = None, None
            try:
                state = self.load(path, model, optimizer, trainer_state)
            except DamagedCheckpoint as exc:
                error = str(exc)
            # A rank that cannot read its own files (its RNG state) makes every rank fall back.
            if any_rank(error is not None, self.info.device):
                failures.append((path, error or f"checkpoint '{path}' is unreadable on another rank"))
                continue
            notes = _incomplete_notes(incomplete, path.name)
            notes += [f"braid: warning: {why}; set aside as {self.set_aside(bad).name}, falling back to {path.name}"
                      for bad, why in failures]
            return path, state, notes
        if failures:
            raise DamagedCheckpoint(f"{failures[0][1]} (no older complete checkpoint loads either)")
        return None, None, _incomplete_notes(incomplete, None)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> dict:
        """Restore model, optimizer and RNG in place; returns the saved trainer state.

        ``trainer_state`` is a template with the keys to read (DCP loads into a given structure).
        Raises ``DamagedCheckpoint`` when a file is missing, cut short or unreadable, and a plain
        ``CheckpointError`` when the checkpoint is intact but was saved under another layout.
        """
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"checkpoint '{path}' is incomplete (no {MARKER} marker); refusing to load it")
        problem = checkpoint_problem(path)
        if problem is None and self.verify:
            expected = read_marker(path).get("checksums") or {}  # markers before checksums: sizes only
            problem = checksums.verify_checksums(path, expected, self.info.rank, self.info.world_size)
        if problem:
            raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: {problem}")
        check_layout(path, read_marker(path).get("layout"), self.layout)
        rng_file = path / f"rng_rank{self.info.rank}.pt"
        rng, refused = None, None
        try:  # before the weights, so that a refused file leaves the model as it was
            rng = load_rng_file(rng_file) if rng_file.is_file() else None  # absent on more ranks than saved
        except UnsafeCheckpointFile as exc:
            refused = str(exc)
        refused = checksums.first_problem(refused)  # every rank enters the collective load below, or none does
        if refused:
            raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: {refused}")
        try:
            if self.deepspeed:
                from braid.parallel import deepspeed_engine

                loaded = deepspeed_engine.load(model, str(path))
            else:
                flat = (read_marker(path).get("layout") or {}).get("optim_state") == OPTIM_FLAT
                loaded = self._load_dcp(path, model, optimizer, trainer_state, flat)
        except UnsafeCheckpointFile as exc:
            raise DamagedCheckpoint(f"checkpoint '{path}' is damaged: {exc}") from None
        if rng is not None:
            set_rng_state(rng)
        return loaded

    def _load_dcp(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
                  flat: bool) -> dict:
        if not flat and hasattr(model, "parts"):
            raise CheckpointError(f"checkpoint '{path}' keeps its optimizer state in the nested form of braid "
                                  "before pipelines; resume it with parallel.pp=1 once, then change parallel.pp")
        dicts = _state_dicts(model, optimizer, flat)
        model_sd, optim_sd = _merged(dicts)
        state = {"model": model_sd, "optim": optim_sd, "trainer": dict(trainer_state)}
        try:
            dcp_load(state, path)
        except UnsafeCheckpointFile:
            raise
        # DCP's errors are long per-rank reports (its CheckpointException is a BaseException): keep one line.
        except (Exception, CheckpointException) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            first = lines[-1] if isinstance(exc, CheckpointException) else lines[0]  # after the rank's traceback
            # Corrupt bytes and a changed model look alike here; resume tells them apart by whether an
            # older checkpoint loads.
            raise DamagedCheckpoint(f"checkpoint '{path}' does not fit this model/layout or is damaged: "
                                    f"{first[:300]}") from None
        options = StateDictOptions(flatten_optimizer_state_dict=flat)
        for (m, o), (m_sd, o_sd) in zip(_parts(model, optimizer), dicts):  # each part its own keys, now loaded
            set_state_dict(m, o, model_state_dict={k: state["model"][k] for k in m_sd},
                           optim_state_dict={k: state["optim"][k] for k in o_sd}, options=options)
        return state["trainer"]


def _incomplete_notes(paths: list[Path], resumed: Optional[str]) -> list[str]:
    """One line per checkpoint newer than the resumed one that lacks its marker (a save cut short, or
    a copy that did not finish): resuming past it silently would rewind without a word."""
    then = f"resuming from {resumed}" if resumed else "no complete checkpoint: starting from iteration 0"
    return [f"braid: warning: checkpoint '{p}' has no {MARKER} marker (its save or copy did not finish); "
            f"ignoring it, {then}" for p in paths]
