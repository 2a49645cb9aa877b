"""Checks of a Megatron indexed dataset's ``.bin``/``.idx`` pair before megatron-core reads it.

megatron-core trusts the pair: a cut-short ``.bin`` fails deep inside numpy ("offset must be
non-negative"), and an ``.idx`` of another dataset reads garbage until a split comes out empty. The
``.idx`` layout (megatron/core/datasets/indexed_dataset.py, ``_IndexWriter``) is: the 9-byte magic,
version ``<Q`` = 1, dtype code ``<B``, sequence count S ``<Q``, document count D ``<Q`` (documents + 1,
it starts with 0), then S int32 lengths, S int64 byte pointers into the ``.bin``, D int64 document
indices, and for multimodal datasets S int8 modes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from braid.errors import DataSourceError

MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
# megatron-core's DType codes and their item sizes
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def check_pair(prefix: str) -> None:
    """Raise ``DataSourceError`` naming the file when ``prefix.idx`` does not describe ``prefix.bin``."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    idx_size, bin_size = idx.stat().st_size, bin_.stat().st_size
    with idx.open("rb") as f:
        head = f.read(_HEADER.size)
    if not head.startswith(MAGIC):
        raise DataSourceError(f"data.source: '{idx}' is not a Megatron index (no MMIDIDX header)")
    if len(head) < _HEADER.size:
        raise DataSourceError(f"data.source: '{idx}' is cut short ({idx_size} bytes, inside its header)")
    _, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if version != 1:
        raise DataSourceError(f"data.source: '{idx}' has index version {version}; megatron-core reads version 1")
    if code not in DTYPE_SIZES:
        raise DataSourceError(f"data.source: '{idx}' has an unknown token dtype code {code}")
    arrays = _HEADER.size + 12 * n_seq + 8 * n_doc
    if idx_size not in (arrays, arrays + n_seq):  # + one mode byte per sequence when multimodal
        raise DataSourceError(f"data.source: '{idx}' is {idx_size} bytes but its header ({n_seq} sequences, "
                              f"{n_doc} document indices) needs {arrays}: cut short or not an index")
    if n_seq == 0 or n_doc < 2:
        raise DataSourceError(f"data.source: '{idx}' holds no documents")
    itemsize = DTYPE_SIZES[code]
    index = np.memmap(idx, mode="r")
    try:
        lengths = np.frombuffer(index, np.int32, n_seq, _HEADER.size)
        pointers = np.frombuffer(index, np.int64, n_seq, _HEADER.size + 4 * n_seq)
        docs = np.frombuffer(index, np.int64, n_doc, _HEADER.size + 12 * n_seq)
        tokens = int(lengths.sum(dtype=np.int64))
        last_end = int(pointers[-1]) + int(lengths[-1]) * itemsize
        doc_bounds_ok = docs[0] == 0 and docs[-1] == n_seq and bool(np.all(np.diff(docs) >= 0))
        lengths_ok = bool(lengths.min() >= 0) and pointers[0] == 0
    finally:
        del index
    if not (doc_bounds_ok and lengths_ok):
        raise DataSourceError(f"data.source: '{idx}' is damaged (its sequence or document indices are inconsistent)")
    if bin_size != tokens * itemsize or last_end != bin_size:
        raise DataSourceError(f"data.source: '{bin_}' is {bin_size} bytes but '{idx.name}' describes {tokens} "
                              f"tokens of {itemsize} bytes ({tokens * itemsize} bytes): the pair does not match "
                              f"(cut short, or .bin and .idx of different datasets)")


def document_count(prefix: str) -> int:
    """Documents in a checked pair (the header's document count less the leading 0)."""
    with open(prefix + ".idx", "rb") as f:
        return _HEADER.unpack(f.read(_HEADER.size))[4] - 1


def half_pair_problem(source: str) -> str | None:
    """A message when ``source`` names half of an indexed pair (one file missing, or the prefix given
    with its ``.bin``/``.idx`` suffix), else None."""
    path = Path(source).expanduser()
    if path.suffix in (".bin", ".idx") and path.is_file():
        stem = str(path.with_suffix(""))
        return (f"data.source '{source}': an indexed dataset is named by its prefix, without .bin/.idx "
                f"(data.source={stem})")
    have_bin, have_idx = Path(f"{path}.bin").is_file(), Path(f"{path}.idx").is_file()
    if have_bin != have_idx:
        present, missing = (f"{path}.bin", f"{path}.idx") if have_bin else (f"{path}.idx", f"{path}.bin")
        return f"data.source: indexed dataset '{source}' has '{present}' but no '{missing}'"
    return None
