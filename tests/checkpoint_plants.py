"""Planting payloads into a genuine checkpoint for the security tests: each would run ``touch <marker>``
when unpickled by a plain ``pickle.load`` / ``torch.load(weights_only=False)``, and the ``COMPLETE``
manifest's sizes and checksums are updated to match, as a tamperer would."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from braid.trainer import checksums
from braid.trainer.checkpoint_layout import MARKER


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refresh_manifest(ckpt: Path) -> None:
    meta = json.loads((ckpt / MARKER).read_text())
    names = [n for n in checksums.files_of(ckpt) if n != MARKER]
    meta["files"] = {n: (ckpt / n).stat().st_size for n in names}
    meta["checksums"] = {n: checksums.file_checksum(ckpt / n) for n in names}
    (ckpt / MARKER).write_text(json.dumps(meta) + "\n")


def plant_metadata(ckpt: Path, marker: Path) -> str:
    """DCP metadata that still describes the checkpoint, with a payload riding along."""
    meta = pickle.loads((ckpt / ".metadata").read_bytes())  # our own genuine file
    meta.planner_data = {**(meta.planner_data or {}), "extra": Payload(marker)}
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    refresh_manifest(ckpt)
    return ".metadata"


def plant_rng(ckpt: Path, marker: Path) -> str:
    state = torch.load(ckpt / "rng_rank0.pt", weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, ckpt / "rng_rank0.pt")
    refresh_manifest(ckpt)
    return "rng_rank0.pt"


def plant_shard_value(ckpt: Path, marker: Path) -> str:
    """A trainer-state value inside the DCP shards (DCP's default planner reads those with
    ``weights_only=False``): the whole checkpoint rewritten by DCP itself, one value replaced."""
    flat = ckpt.parent / f".{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, flat)
    state = torch.load(flat, weights_only=False)  # our own genuine file
    flat.unlink()
    state["trainer"]["consumed_samples"] = Payload(marker)
    for f in list(ckpt.glob("*.distcp")) + [ckpt / ".metadata"]:
        f.unlink()
    with warnings.catch_warnings():  # DCP warns that a lone process saves without a process group
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save(state, checkpoint_id=str(ckpt), no_dist=True)
    refresh_manifest(ckpt)
    return next(ckpt.glob("*.distcp")).name


def plant_torch_file(path: Path, marker: Path) -> str:
    """Any ``torch.save`` file (DeepSpeed's, a pytorch_model.bin) with a payload among its values."""
    state = torch.load(path, weights_only=False)  # our own genuine file
    state["extra"] = Payload(marker)
    torch.save(state, path)
    return path.name


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst
