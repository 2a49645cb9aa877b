"""Fault-tolerant document readers for preprocessing: bad records are counted and skipped, not fatal.

Each reader yields document texts and adds to a ``Counter`` of skips: ``empty`` (blank line, empty or
whitespace-only text), ``undecodable`` (invalid UTF-8), ``malformed`` (not JSON, not an object, no
text field, or a non-string field).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator

from braid.data.sources import RECORD_SUFFIXES, TEXT_SUFFIXES
from braid.errors import DataSourceError


def _accept(text, skipped: Counter) -> bool:
    if not isinstance(text, str):
        skipped["malformed"] += 1
        return False
    if not text.strip():
        skipped["empty"] += 1
        return False
    return True


def jsonl_texts(path: Path, text_field: str, skipped: Counter) -> Iterator[str]:
    """One JSON object per line; read as bytes so one invalid UTF-8 line skips only itself."""
    with path.open("rb") as f:
        for raw in f:
            if not raw.strip():
                skipped["empty"] += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped["malformed"] += 1
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if _accept(text, skipped):
                yield text


def parquet_texts(path: Path, text_field: str, skipped: Counter) -> Iterator[str]:
    """Column ``text_field`` of a parquet file, read in record batches (bounded memory)."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if text_field not in f.schema_arrow.names:
        raise DataSourceError(f"--input '{path}' has no column '{text_field}' (columns: "
                              f"{', '.join(f.schema_arrow.names)}; pass --text-field)")
    for batch in f.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if _accept(text, skipped):
                yield text


def text_file(path: Path, skipped: Counter) -> Iterator[str]:
    """A whole plain-text file as one document."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skipped["undecodable"] += 1
        return
    if _accept(text, skipped):
        yield text


def hf_texts(name: str, split: str, text_field: str, skipped: Counter) -> Iterator[str]:
    """A Hugging Face dataset, streamed (nothing is downloaded in full)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:
        raise DataSourceError(f"--input '{name}' could not be loaded as a Hugging Face dataset: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for record in ds:
        if _accept(record.get(text_field), skipped):
            yield record[text_field]


def iter_texts(source: str, text_field: str, split: str, skipped: Counter) -> Iterator[str]:
    """Documents of a jsonl/json-lines/parquet file, a directory (recursively, sorted) or a HF dataset."""
    path = Path(source).expanduser()
    if not path.exists():
        if source.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES | RECORD_SUFFIXES:
            raise DataSourceError(f"--input '{source}' does not exist")
        yield from hf_texts(source, split, text_field, skipped)
        return
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            yield from jsonl_texts(f, text_field, skipped)
        elif f.suffix == ".parquet":
            yield from parquet_texts(f, text_field, skipped)
        elif f.suffix in TEXT_SUFFIXES:
            yield from text_file(f, skipped)
        elif path.is_file():
            raise DataSourceError(f"--input '{path}': unsupported file type (use .jsonl, .json, .parquet "
                                  f"or a directory of {', '.join(sorted(TEXT_SUFFIXES))} files)")
        else:
            skipped["unsupported_file"] += 1


def split_long_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most ``max_chars`` characters that concatenate back to ``text``, cut after the last
    newline or space in each window when there is one (so a tokenizer rarely sees a split word)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind("\n", start, end), text.rfind(" ", start, end))
        end = cut + 1 if cut > start else end
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces
