"""Fault-tolerant document readers for preprocessing: bad records are counted and skipped, not fatal.

Each reader yields document texts and adds to a ``Skips`` count: ``empty`` (blank line, empty or
whitespace-only text), ``undecodable`` (not UTF-8 text), ``malformed`` (not JSON, not an object, no
text field, or a non-string field), ``unsupported_file`` (in a directory, a file of another type).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator

from braid.data.sources import RECORD_SUFFIXES, TEXT_SUFFIXES, read_text
from braid.errors import DataSourceError

REASONS = {"empty": "empty", "undecodable": "not UTF-8 text", "malformed": "not a JSON object with a string text "
           "field", "unsupported_file": "of an unsupported type"}


class Skips(Counter):
    """Skipped records by reason, and where the first of each reason was (for the error of an input
    that holds nothing usable)."""

    def __init__(self):
        super().__init__()
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str) -> None:
        self[reason] += 1
        self.first.setdefault(reason, where)

    def describe(self) -> str:
        return ", ".join(f"{self[r]} {REASONS[r]} (first: {self.first[r]})" if r in self.first else
                         f"{self[r]} {REASONS[r]}" for r in REASONS if self[r])


def _accept(text, skipped: Skips, where: str) -> bool:
    if not isinstance(text, str):
        skipped.add("malformed", where)
        return False
    if not text.strip():
        skipped.add("empty", where)
        return False
    return True


def jsonl_texts(path: Path, text_field: str, skipped: Skips) -> Iterator[str]:
    """One JSON object per line; read as bytes so one invalid UTF-8 line skips only itself."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path.name} line {lineno}"
            if not raw.strip():
                skipped.add("empty", where)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped.add("undecodable", where)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped.add("malformed", where)
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if _accept(text, skipped, where):
                yield text


def parquet_texts(path: Path, text_field: str, skipped: Skips) -> Iterator[str]:
    """Column ``text_field`` of a parquet file, read in record batches (bounded memory)."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if text_field not in f.schema_arrow.names:
        raise DataSourceError(f"--input '{path}' has no column '{text_field}' (columns: "
                              f"{', '.join(f.schema_arrow.names)}; pass --text-field)")
    row = 0
    for batch in f.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if _accept(text, skipped, f"{path.name} row {row}"):
                yield text


def text_file(path: Path, skipped: Skips) -> Iterator[str]:
    """A whole plain-text file as one document (not UTF-8 or with NUL bytes: skipped as undecodable)."""
    text = read_text(path)
    if text is None:
        skipped.add("undecodable", path.name)
        return
    if _accept(text, skipped, path.name):
        yield text


def hf_texts(name: str, split: str, text_field: str, skipped: Skips) -> Iterator[str]:
    """A Hugging Face dataset, streamed (nothing is downloaded in full)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:
        raise DataSourceError(f"--input '{name}' could not be loaded as a Hugging Face dataset: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for i, record in enumerate(ds):
        if _accept(record.get(text_field), skipped, f"record {i}"):
            yield record[text_field]


_TEXT = ", ".join(sorted(TEXT_SUFFIXES))


def _file_texts(f: Path, text_field: str, skipped: Skips) -> Iterator[str]:
    if f.suffix in (".jsonl", ".json"):
        return jsonl_texts(f, text_field, skipped)
    if f.suffix == ".parquet":
        return parquet_texts(f, text_field, skipped)
    return text_file(f, skipped)


def _dir_texts(files: list[Path], text_field: str, skipped: Skips) -> Iterator[str]:
    for f in files:
        if f.suffix in (".jsonl", ".json", ".parquet") or f.suffix in TEXT_SUFFIXES:
            yield from _file_texts(f, text_field, skipped)
        else:
            skipped.add("unsupported_file", f.name)


def iter_texts(source: str, text_field: str, split: str, skipped: Skips) -> Iterator[str]:
    """Documents of a jsonl/json-lines/parquet/text file, a directory (recursively, sorted) or a HF dataset.

    The input is checked now (a missing path or an unsupported file raises before anything is read or
    written); the documents are read as the iterator is consumed.
    """
    path = Path(source).expanduser()
    if not path.exists():
        if source.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES | RECORD_SUFFIXES:
            raise DataSourceError(f"--input '{source}' does not exist")
        return hf_texts(source, split, text_field, skipped)
    if path.is_file():
        if path.suffix in (".jsonl", ".json", ".parquet") or path.suffix in TEXT_SUFFIXES:
            return _file_texts(path, text_field, skipped)
        raise DataSourceError(f"--input '{path}': unsupported file type (use .jsonl, .json, .parquet, {_TEXT} "
                              f"or a directory of such files)")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise DataSourceError(f"--input '{path}' is an empty directory")
    return _dir_texts(files, text_field, skipped)


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
