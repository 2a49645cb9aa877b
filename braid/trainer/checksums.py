"""Checksums of a checkpoint's files, for its ``COMPLETE`` manifest, and their verification.

xxh3-64 (the ``xxhash`` package, already required by datasets and wandb): several GB/s per core,
about 2.5x zlib.crc32 here, so hashing costs a fraction of writing the files. Sizes catch a file cut
short; only a checksum catches bytes overwritten in place. Each rank hashes the files it wrote
(DCP's ``__<rank>_<n>.distcp``, ``rng_rank<r>.pt``, DeepSpeed's ``*rank_<r>_*``; rank 0 the rest),
while they are still in its page cache, and rank 0 records them all; loading splits the files the
same way over the ranks present.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Iterable, Optional

try:
    import xxhash
except ImportError:  # an environment built by hand (the GPU image has torch/transformers only): crc32
    xxhash = None

ALGORITHM = "xxh3_64" if xxhash is not None else "crc32"
_CHUNK = 8 << 20
_RANK_PATTERNS = (re.compile(r"^__(\d+)_\d+\.distcp$"), re.compile(r"rank_?(\d+)"))


def file_checksum(path: Path, algorithm: Optional[str] = None) -> str:
    """``<algorithm>:<hex>`` of a file's bytes (xxh3_64, or crc32 where xxhash is not installed)."""
    algorithm = algorithm or ALGORITHM
    with open(path, "rb") as f:
        if algorithm == "crc32":
            crc = 0
            while chunk := f.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
            return f"crc32:{crc:08x}"
        h = xxhash.xxh3_64()
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def owner(name: str, world_size: int) -> int:
    """The rank that hashes file ``name`` (relative path): the rank its name carries, else 0."""
    base = Path(name).name
    for pattern in _RANK_PATTERNS:
        m = pattern.search(base)
        if m:
            return int(m.group(1)) % world_size
    return 0


def files_of(directory: Path) -> list[str]:
    return [str(f.relative_to(directory)) for f in sorted(Path(directory).rglob("*")) if f.is_file()]


def own_checksums(directory: Path, rank: int, world_size: int) -> dict[str, str]:
    """Checksums of the files under ``directory`` that ``rank`` hashes."""
    return {n: file_checksum(Path(directory) / n) for n in files_of(directory) if owner(n, world_size) == rank}


def _all_gather(obj):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_checksums(directory: Path, rank: int, world_size: int) -> dict[str, str]:
    """Collective: every rank's :func:`own_checksums`, merged (the same dict on every rank)."""
    sums: dict[str, str] = {}
    for part in _all_gather(own_checksums(directory, rank, world_size)):
        sums.update(part)
    return sums


def complete_checksums(directory: Path, sums: dict[str, str]) -> dict[str, str]:
    """``sums`` for exactly the files under ``directory`` now: a file written after the ranks hashed
    (by rank 0, just before the manifest) is hashed here, so the manifest covers every file."""
    return {n: sums.get(n) or file_checksum(Path(directory) / n) for n in files_of(directory)}


def mismatch(directory: Path, expected: dict[str, str], names: Optional[Iterable[str]] = None) -> Optional[str]:
    """The first of ``names`` (default: all expected) whose bytes differ from ``expected``, as a reason."""
    for name in sorted(expected if names is None else names):
        want = expected.get(name)
        if want is None:
            continue
        algorithm = want.split(":", 1)[0]
        if algorithm not in ("xxh3_64", "crc32"):
            return f"{name} has a checksum of unknown kind '{algorithm}'"
        if algorithm == "xxh3_64" and xxhash is None:
            continue  # written where xxhash was installed; sizes are still checked
        path = Path(directory) / name
        try:
            got = file_checksum(path, algorithm)
        except OSError as exc:
            return f"{name} is unreadable ({type(exc).__name__})"
        if got != want:
            return f"{name} does not match its checksum (bytes changed after it was written)"
    return None


def first_problem(problem: Optional[str]) -> Optional[str]:
    """Collective: the problem of the lowest rank that has one, on every rank (None when none has),
    so that all ranks give up together and each names the file."""
    problems = [p for p in _all_gather(problem) if p]
    return problems[0] if problems else None


def verify_checksums(directory: Path, expected: dict[str, str], rank: int, world_size: int) -> Optional[str]:
    """Collective: every rank checks its share of ``expected``; all ranks get the first mismatch (or None)."""
    mine = [n for n in expected if owner(n, world_size) == rank]
    return first_problem(mismatch(directory, expected, mine))
