"""A checkpoint describes itself: ``step_<N>/config.yaml`` (the resolved config it was trained with) and
``step_<N>/braid.json`` (braid version, layout, counters), and what may change when a run resumes it.

Torch-free, so the trainer checks a resume, and the tools read a checkpoint's config, before any heavy
import or any write. Checkpoints written before these files existed fall back to ``<run.dir>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import metadata
from pathlib import Path
from typing import Optional

from braid.config import Config, load_config, to_yaml
from braid.errors import ConfigError
from braid.trainer.checkpoint_layout import MARKER, STEP_RE, complete_checkpoints

CONFIG_FILE = "config.yaml"
INFO_FILE = "braid.json"

# Keys a resume must keep: the weights (model.*) and the meaning of consumed_samples (which sample of which
# sequence order comes next: source, tokenizer, split, packing length, seed) depend on them. A change is a
# new run: start one from these weights with checkpoint.init_from.
FIXED_PREFIXES = ("model.",)
FIXED_KEYS = ("data.source", "data.tokenizer", "data.text_field", "data.hf_split", "data.seq_len",
              "data.valid_fraction", "data.streaming", "data.stream_lanes", "train.seed")
# Differ by nature between the command and the checkpoint; not worth a line.
QUIET_KEYS = ("run.dir", "run.name", "checkpoint.resume", "checkpoint.init_from")


def braid_version() -> str:
    try:
        return metadata.version("braid")
    except metadata.PackageNotFoundError:
        return "unknown"


def describe(cfg: Config, step: int, consumed_samples: int, consumed_tokens: int, layout: dict) -> dict[str, str]:
    """The files a checkpoint carries about itself (name -> text), written before its marker."""
    info = {"braid_version": braid_version(), "step": step, "consumed_samples": consumed_samples,
            "consumed_tokens": consumed_tokens, "layout": layout}
    return {CONFIG_FILE: to_yaml(cfg), INFO_FILE: json.dumps(info, indent=1) + "\n"}


def config_path(ckpt_dir: Path) -> Optional[Path]:
    """The config a checkpoint was trained with: its own, else (older checkpoints) its run dir's."""
    for path in (Path(ckpt_dir) / CONFIG_FILE, Path(ckpt_dir).parent.parent / CONFIG_FILE):
        if path.is_file():
            return path
    return None


def checkpoint_info(ckpt_dir: Path) -> dict:
    try:
        return json.loads((Path(ckpt_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fixed(key: str, step: Optional[int]) -> bool:
    # At step 0 (a from-hf import) no sample is consumed yet: only the weights bind the run.
    return key.startswith(FIXED_PREFIXES) or (key in FIXED_KEYS and step != 0)


def resume_target(cfg: Config) -> Optional[Path]:
    """The checkpoint ``checkpoint.resume`` will load (auto: the newest complete one), or None."""
    spec = cfg.checkpoint.resume
    if spec == "none":
        return None
    if spec == "auto":
        found = complete_checkpoints(cfg.run_dir / "checkpoints")
        return found[-1][1] if found else None
    path = Path(spec)
    if (path / "latest").is_file():  # a checkpoints/ dir
        path = path / (path / "latest").read_text().strip()
    return path


def _step_of(ckpt: Path) -> Optional[int]:
    try:
        return int(json.loads((ckpt / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = STEP_RE.match(ckpt.name)
        return int(m.group(1)) if m else None


def check_resume(cfg: Config) -> tuple[Optional[Path], Optional[str]]:
    """Before anything is written: refuse a run dir holding something else, or a resume whose fixed keys
    differ from the checkpoint's; returns (checkpoint to resume, one line on the settings that change)."""
    run_dir = cfg.run_dir
    if (run_dir / "config.json").is_file() and not (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"config key 'run.dir' = {run_dir} holds a Hugging Face export (config.json), not a "
                          "braid run; pick another run.dir")
    ckpt = resume_target(cfg)
    if ckpt is None or not (ckpt / MARKER).is_file():
        return ckpt, None  # an incomplete explicit path fails to load with its own message
    saved_path = config_path(ckpt)
    step = _step_of(ckpt)
    if step is not None and cfg.train.steps < step:
        raise ConfigError(f"config key 'train.steps' = {cfg.train.steps} is below iteration {step} of checkpoint "
                          f"'{ckpt}': that run is already past it (raise train.steps to continue it)")
    if saved_path is None:
        return ckpt, None
    try:
        saved = load_config(saved_path)
    except ConfigError as exc:
        raise ConfigError(f"checkpoint '{ckpt}': its config {saved_path} no longer loads: {exc}") from None
    old, new = _flat(dataclasses.asdict(saved)), _flat(dataclasses.asdict(cfg))
    changed = [k for k in new if k in old and old[k] != new[k] and k not in QUIET_KEYS]
    for key in changed:
        if _fixed(key, step):
            raise ConfigError(f"config key '{key}' = {new[key]!r} differs from checkpoint '{ckpt}', trained with "
                              f"{old[key]!r}; it cannot change on resume (keep it, use another run.dir, or start "
                              "from these weights with checkpoint.init_from)")
    if not changed:
        return ckpt, None
    changes = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed)
    return ckpt, f"braid: resuming {ckpt.name} with changed settings: {changes}"
