"""Names of the checkpoint directory layout, torch-free so tools can read a run instantly."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from braid.trainer.safe_pickle import metadata_problem

MARKER = "COMPLETE"  # written last into a checkpoint directory; without it the directory is ignored
STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step_<N>`` directory, complete or not, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every complete checkpoint, oldest first."""
    return [(s, p) for s, p in checkpoint_dirs(root) if (p / MARKER).is_file()]


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a checkpoint marked complete cannot be trusted, or None: an unreadable marker, a file the
    marker lists that is missing or has another size (markers written before sizes were kept: not
    checked), or DCP metadata that is garbled or names code (vetted without running it). Checksums
    are left to loading (``checkpoint.verify``): they read every byte."""
    try:
        meta = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return f"its {MARKER} marker is unreadable"
    for name, size in (meta.get("files") or {}).items():
        f = Path(path) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return metadata_problem(Path(path))
