"""Read a torch DCP ``.metadata`` pickle without running code from it.

DCP writes its metadata with plain ``pickle`` and torch reads it back with ``pickle.load``, which calls
whatever the file names. A checkpoint is data from elsewhere, so braid reads the file through an
unpickler that resolves only what DCP metadata holds (its dataclasses, ``torch.Size``, dtypes,
layouts, paths; builtin containers and scalars need no lookup) and refuses any other name before an
object is built. Torch-free with ``resolve=False``: the names are checked and stand-ins are built, so
``braid.inspect`` can vet a checkpoint instantly.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

from braid.errors import CheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_PATHS = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {(_DCP_METADATA, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                  "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
                                  "MetadataIndex", "StorageMeta")}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
       # Older torch kept TensorProperties with the sharded-tensor metadata.
       ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
       ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
       ("torch", "Size"), ("torch.serialization", "_get_layout")}
    # StorageMeta.checkpoint_id is the path the checkpoint was saved to (pathlib._local from Python 3.13).
    | {(m, n) for m in ("pathlib", "pathlib._local") for n in _PATHS}
)
# ``torch.<name>`` constants a tensor's properties refer to; resolved ones must be of these kinds.
TORCH_CONSTANTS: frozenset[str] = frozenset(
    "float32 float float64 double float16 half bfloat16 complex32 chalf complex64 cfloat complex128 cdouble "
    "uint8 int8 int16 short int32 int int64 long bool uint16 uint32 uint64 float8_e4m3fn float8_e5m2 "
    "float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2 qint8 quint8 qint32 quint4x2 quint2x4 "
    "bits1x8 bits2x4 bits4x2 bits8 bits16 "
    "strided sparse_coo sparse_csr sparse_csc sparse_bsr sparse_bsc _mkldnn jagged "
    "contiguous_format channels_last channels_last_3d preserve_format".split())


class UnsafeCheckpointFile(CheckpointError):
    """A checkpoint file that cannot be read safely: it names something not allowed for its kind
    (refused before anything is built), or it is not a pickle at all. The message names the file."""


class _StandIn:
    """What a name resolves to when only vetting: takes any arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _is_torch_constant(obj: Any) -> bool:
    import torch

    return isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` resolving only :data:`ALLOWED` names and torch constants."""

    def __init__(self, file, *, name: str, resolve: bool = True):
        super().__init__(file)
        self._name, self._resolve = name, resolve

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in ALLOWED or (module == "torch" and name in TORCH_CONSTANTS)
        if not allowed:
            raise UnsafeCheckpointFile(f"{self._name} would call {module}.{name} when loaded, which DCP metadata never "
                               "holds")
        if not self._resolve:
            return _StandIn
        obj = getattr(importlib.import_module(module), name)
        if module == "torch" and name != "Size" and not _is_torch_constant(obj):
            raise UnsafeCheckpointFile(f"{self._name} names torch.{name}, not a dtype, layout or memory format")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointFile(f"{self._name} holds a persistent reference, which DCP metadata never holds")


def load_metadata_bytes(data: bytes, *, name: str = ".metadata", resolve: bool = True) -> Any:
    """Unpickle DCP metadata ``data``; ``UnsafeCheckpointFile`` (one line naming ``name``) for a refused
    name or bytes that are not a pickle at all."""
    try:
        return MetadataUnpickler(io.BytesIO(data), name=name, resolve=resolve).load()
    except UnsafeCheckpointFile:
        raise
    except Exception as exc:  # garbage bytes raise about anything: UnpicklingError, EOFError, ValueError, ...
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise UnsafeCheckpointFile(f"{name} is unreadable ({type(exc).__name__}{': ' + detail if detail else ''})") \
            from None


def metadata_problem(ckpt_dir: Path) -> str | None:
    """Why ``ckpt_dir/.metadata`` cannot be read safely (torch-free), or None (also when there is none)."""
    path = Path(ckpt_dir) / ".metadata"
    if not path.is_file():
        return None
    try:
        load_metadata_bytes(path.read_bytes(), resolve=False)
    except UnsafeCheckpointFile as exc:
        return str(exc)
    except OSError as exc:
        return f".metadata is unreadable ({type(exc).__name__})"
    return None
