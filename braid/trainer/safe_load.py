"""Loading checkpoint files without running code from them (README, Security).

Every file inside a checkpoint is untrusted data. Pickles are read either through
:mod:`braid.trainer.safe_pickle` (DCP metadata) or ``torch.load(weights_only=True)`` with an explicit,
minimal allow-list (everything else): a file that names anything more is refused before it is built.
DCP's own ``FileSystemReader.read_metadata`` uses plain ``pickle.load`` and its default load planner
``torch.load(weights_only=False)`` for non-tensor values, so braid replaces both.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from braid.trainer.safe_pickle import UnsafeCheckpointFile, load_metadata_bytes

METADATA = ".metadata"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def read_dcp_metadata(ckpt_dir: str | Path) -> Metadata:
    """The ``.metadata`` of a DCP checkpoint, read through the restricted unpickler (one-line
    ``UnsafeCheckpointFile`` naming the file when it is unsafe or unreadable)."""
    path = Path(ckpt_dir) / METADATA
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnsafeCheckpointFile(f"{METADATA} is unreadable ({type(exc).__name__})") from None
    meta = load_metadata_bytes(data, name=METADATA)
    if not isinstance(meta, Metadata):
        raise UnsafeCheckpointFile(f"{METADATA} holds a {type(meta).__name__}, not DCP metadata")
    return meta


class SafeFileSystemReader(dcp.FileSystemReader):
    """A ``FileSystemReader`` whose metadata comes from :func:`read_dcp_metadata`, read once up front:
    an unreadable file is a one-line error here instead of DCP's logged tracebacks."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._metadata = read_dcp_metadata(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        meta = self._metadata
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = getattr(self, "load_id", None)
        return meta


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but a non-tensor value (trainer state, optimizer hyper-parameters) must
    unpickle with ``weights_only=True`` before the default planner reads it."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as exc:
            where = read_item.dest_index.fqn
            storage = getattr(getattr(self, "metadata", None), "storage_data", None) or {}
            info = storage.get(read_item.storage_index)
            if info is not None:
                where = f"{info.relative_path} ({where})"
            raise UnsafeCheckpointFile(f"{where} {_why_refused(exc)}") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def dcp_load(state: dict, ckpt_dir: str | Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` of ``state`` in place from ``ckpt_dir``, through the safe reader and planner."""
    reader = SafeFileSystemReader(ckpt_dir)
    try:
        with warnings.catch_warnings():  # DCP warns that a lone process loads without a process group
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as exc:  # DCP reports each rank's exception inside its own
        refused = [e for e, _ in exc.failures.values() if isinstance(e, UnsafeCheckpointFile)]
        if refused:
            raise refused[0] from None
        raise


def _why_refused(exc: BaseException) -> str:
    found = _GLOBAL_RE.search(str(exc))
    if found:
        return f"would call {found.group(1)} when loaded, which a file of tensors and plain data never does"
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"is unreadable ({type(exc).__name__}{': ' + first if first else ''})"


def load_weights_only(path: str | Path, allowed: Iterable[Any] = (), map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` that also accepts the globals in ``allowed`` (objects, or
    ``(object, "module.name")`` pairs as torch.serialization.safe_globals takes them); anything else
    the file names is refused with one line naming the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UnsafeCheckpointFile(f"{path.name} {_why_refused(exc)}") from None


def legacy_rng_globals() -> list:
    """What RNG files written before they held only tensors and numbers name: numpy's array rebuild."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    allowed: list = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                     (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                     (multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]
    return allowed


PICKLED_HF_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_pickled_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a HF directory's ``pytorch_model.bin`` (or its shards), each file read with
    ``weights_only=True`` and nothing more allowed: a state dict is tensors in a dict."""
    path = Path(path)
    index = path / "pytorch_model.bin.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["pytorch_model.bin"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = load_weights_only(path / name, map_location="cpu")
        except UnsafeCheckpointFile as exc:
            raise UnsafeCheckpointFile(f"'{path}': {exc}") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise UnsafeCheckpointFile(f"'{path}': {name} is not a state dict of tensors")
        state.update(part)
    return state
