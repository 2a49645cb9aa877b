"""Where documents come from: the embedded corpus, local files, Hugging Face datasets."""

from __future__ import annotations

import functools
import json
import os
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


def _records(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataSourceError(f"data.source '{path}': line {lineno} is not valid JSON") from None
                if text_field not in record:
                    raise DataSourceError(f"data.source '{path}': line {lineno} has no field '{text_field}' "
                                          f"(set data.text_field)")
                yield str(record[text_field])
        return
    import datasets

    kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}[path.suffix]
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    if text_field not in ds.column_names:
        raise DataSourceError(f"data.source '{path}' has no column '{text_field}' (columns: "
                              f"{', '.join(ds.column_names)}; set data.text_field)")
    yield from (str(t) for t in ds[text_field])


def local_documents(path: Path, text_field: str) -> list[tuple[str, str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    docs: list[tuple[str, str]] = []
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            docs.append((str(f), f.read_text(encoding="utf-8", errors="replace")))
        elif f.suffix in RECORD_SUFFIXES:
            docs.extend((f"{f}:{i}", text) for i, text in enumerate(_records(f, text_field)))
        elif path.is_file():
            raise DataSourceError(f"data.source '{path}': unsupported file type (use one of "
                                  f"{', '.join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))})")
    if not docs:
        raise DataSourceError(f"data.source '{path}' holds no readable documents")
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
