"""Where documents come from: the embedded corpus, local files, Hugging Face datasets."""

from __future__ import annotations

import functools
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from braid.errors import DataSourceError

# Plain-text files become one document each; record files hold one document per record.
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
RECORD_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv"}
_EMBEDDED_SKIP = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip",
                  "site-packages", "dist-packages", "__pycache__"}


@functools.lru_cache(maxsize=1)
def _embedded_corpus() -> tuple[tuple[str, str], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EMBEDDED_SKIP)
        for fname in sorted(filenames):
            if fname.endswith(".py"):
                path = Path(dirpath) / fname
                docs.append((str(path.relative_to(root)), path.read_text(encoding="utf-8", errors="replace")))
    docs.sort()
    if not docs:
        raise DataSourceError(f"data.source 'embedded': no Python sources found under {root}")
    return tuple(docs)


def embedded_corpus() -> list[tuple[str, str]]:
    """The Python standard library's own source files: present on every Python install, offline.

    Returns ``(name, text)`` sorted by name, so the corpus is deterministic for a Python version.
    Read once per process (tests and evaluation build several datasets from it).
    """
    return list(_embedded_corpus())


def _warn(message: str) -> None:
    """One ``braid: warning:`` line on stderr, from the first rank only (every rank reads the source)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"braid: warning: {message}", file=sys.stderr, flush=True)


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (undecodable, or NUL bytes: a binary file)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
               dict: "an object"}


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost cause: datasets wraps parse errors in a generic message."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _jsonl_records(path: Path, text_field: str) -> Iterator[str]:
    # Read as bytes: a text-mode reader fails with a bare UnicodeDecodeError that names no line.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"data.source '{path}': line {lineno}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataSourceError(f"{where} is not UTF-8 text (not a JSON lines file?)") from None
            except json.JSONDecodeError:
                raise DataSourceError(f"{where} is not valid JSON (not a JSON lines file?)") from None
            if not isinstance(record, dict):
                raise DataSourceError(f"{where} is not a JSON object (JSON lines: one object per line)")
            if text_field not in record:
                raise DataSourceError(f"{where} has no field '{text_field}' (set data.text_field)")
            if not isinstance(record[text_field], str):
                kind = _JSON_TYPES.get(type(record[text_field]), type(record[text_field]).__name__)
                raise DataSourceError(f"{where}: field '{text_field}' is {kind}, not a string")
            yield record[text_field]


def _records(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_records(path, text_field)
        return
    import datasets

    kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}[path.suffix]
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # pyarrow/datasets parse errors: one line naming the file, not their traceback
        raise DataSourceError(f"data.source '{path}' could not be read as {kind}: {_root_cause(exc)}") from None
    if text_field not in ds.column_names:
        raise DataSourceError(f"data.source '{path}' has no column '{text_field}' (columns: "
                              f"{', '.join(ds.column_names)}; set data.text_field)")
    yield from (str(t) for t in ds[text_field])


_SUFFIXES = ", ".join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))


def _text_document(path: Path) -> tuple[str, str]:
    text = read_text(path)
    if text is None:
        raise DataSourceError(f"data.source '{path}' is not UTF-8 text")
    if not text.strip():
        raise DataSourceError(f"data.source '{path}' is empty")
    return str(path), text


def local_documents(path: Path, text_field: str) -> list[tuple[str, str]]:
    """Documents of one file, or of every text/record file under a directory (sorted by path).

    A single text file that is not UTF-8 or is empty is refused. In a directory such files are
    skipped and counted in one warning line; a directory with nothing usable left is refused.
    """
    if path.is_file():
        if path.suffix in TEXT_SUFFIXES:
            return [_text_document(path)]
        if path.suffix in RECORD_SUFFIXES:
            docs = [(f"{path}:{i}", text) for i, text in enumerate(_records(path, text_field))]
            if not docs:
                raise DataSourceError(f"data.source '{path}' holds no records")
            return docs
        raise DataSourceError(f"data.source '{path}': unsupported file type (use one of {_SUFFIXES})")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | RECORD_SUFFIXES)
    docs: list[tuple[str, str]] = []
    skipped = {"not UTF-8 text": 0, "empty": 0}
    first_skipped = None
    for f in files:
        if f.suffix in RECORD_SUFFIXES:
            docs.extend((f"{f}:{i}", text) for i, text in enumerate(_records(f, text_field)))
            continue
        text = read_text(f)
        if text is None or not text.strip():
            skipped["empty" if text is not None else "not UTF-8 text"] += 1
            first_skipped = first_skipped or f
            continue
        docs.append((str(f), text))
    why = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n)
    if not files:
        raise DataSourceError(f"data.source '{path}' holds no {_SUFFIXES} files")
    if not docs:
        raise DataSourceError(f"data.source '{path}' holds no usable documents ({why or 'no records'})")
    if why:
        _warn(f"data.source '{path}': skipped {sum(skipped.values())} of {len(files)} files ({why}; first: "
              f"{first_skipped})")
    return docs


def hf_documents(name: str, split: str, text_field: str) -> list[tuple[str, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataSourceError(f"data.source '{name}' could not be loaded as a Hugging Face dataset: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if text_field not in ds.column_names:
        raise DataSourceError(f"data.source '{name}' has no column '{text_field}' (columns: "
                              f"{', '.join(ds.column_names)}; set data.text_field)")
    return [(f"{name}:{i}", str(t)) for i, t in enumerate(ds[text_field])]


def load_documents(source: str, text_field: str = "text", split: str = "train") -> list[tuple[str, str]]:
    """``(name, text)`` documents for ``data.source``: ``embedded``, a local path, or a dataset name."""
    if source == "embedded":
        return embedded_corpus()
    path = Path(source).expanduser()
    if path.exists():
        return local_documents(path, text_field)
    if source.startswith((".", "/", "~")) or Path(source).suffix in TEXT_SUFFIXES | RECORD_SUFFIXES:
        raise DataSourceError(f"data.source '{source}' does not exist")
    return hf_documents(source, split, text_field)
