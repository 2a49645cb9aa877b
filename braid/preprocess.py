"""Tokenize a corpus into a Megatron indexed dataset (``<prefix>_text_document.bin`` / ``.idx``).

    python -m braid.preprocess --input <file.jsonl|file.parquet|file.txt|text dir|HF dataset> \\
        --tokenizer <bytes|path> --output-prefix <prefix> [--workers N]

As Megatron's ``tools/preprocess_data.py``, the files are named ``<prefix>_<text field>_document``
(``data.source`` takes that name). Every document is followed by the tokenizer's EOS (braid recovers
document boundaries from it). Empty, undecodable and malformed records are skipped and counted; an
input with no usable document is refused (exit 2). Documents longer than ``--max-doc-chars`` are
tokenized in pieces (cut at whitespace) and kept whole. The summary is printed at the end and
written to ``<dataset>.stats.json``. Files are written under temporary names and renamed when
complete, so a failed or interrupted run leaves nothing at the dataset's name. Writing uses
megatron-core's ``IndexedDatasetBuilder`` (CPU only; imported lazily).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from braid.data.records import Skips, iter_texts, split_long_text
from braid.data.tokenizer import load_tokenizer
from braid.errors import BraidError, DataSourceError

SUFFIXES = (".bin", ".stats.json", ".idx")  # renamed in this order: the .idx, read first, comes last

_TOKENIZER = None  # one per worker process, loaded by _init_worker
_MAX_CHARS = 1_000_000


def _init_worker(spec: str, max_chars: int) -> None:
    global _TOKENIZER, _MAX_CHARS
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism
    _TOKENIZER, _MAX_CHARS = load_tokenizer(spec), max_chars


def _encode_chunk(texts: list[str]) -> tuple[list[np.ndarray], int, int]:
    """``(token arrays with EOS appended, documents split into pieces, documents with no tokens)``."""
    out, n_split, n_empty = [], 0, 0
    for text in texts:
        pieces = split_long_text(text, _MAX_CHARS)
        n_split += len(pieces) > 1
        ids = np.concatenate(_TOKENIZER.encode_batch(pieces)) if pieces else np.zeros(0, np.int32)
        if len(ids) == 0:  # e.g. text the tokenizer maps to nothing
            n_empty += 1
            continue
        out.append(np.append(ids.astype(np.int64), _TOKENIZER.eos_id))
    return out, n_split, n_empty


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _parallel_map(chunks: Iterator[list[str]], workers: int, tokenizer: str, max_chars: int) -> Iterator:
    """``_encode_chunk`` over ``chunks`` in ``workers`` processes, results in input order, at most
    ``2 × workers`` chunks in flight (the input may be far larger than memory). A crashed worker
    raises ``BrokenProcessPool`` instead of hanging, unlike ``multiprocessing.Pool``."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may hold pyarrow/tokenizer threads that fork would copy in a bad state
    with ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker, (tokenizer, max_chars)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_encode_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def dataset_prefix(output_prefix: str, text_field: str = "text") -> str:
    """The name Megatron's preprocess_data.py gives its output: ``<prefix>_<json key>_document``."""
    return f"{output_prefix}_{text_field}_document"


@contextlib.contextmanager
def _staged(prefix: str) -> Iterator[str]:
    """A temporary prefix next to ``prefix``; its files are renamed to ``prefix`` when the block succeeds.

    On failure the temporary files go, and so do the directories this created, so bad input writes
    nothing. A killed process leaves only a hidden ``.<name>.*.partial`` directory behind.
    """
    target = Path(prefix)
    created = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield str(tmp / target.name)
        for suffix in SUFFIXES:
            os.replace(tmp / (target.name + suffix), prefix + suffix)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not Path(prefix + SUFFIXES[-1]).exists():
            for d in created:  # deepest first; only still-empty ones (another process may write there)
                with contextlib.suppress(OSError):
                    d.rmdir()


def preprocess(input: str, tokenizer: str, output_prefix: str, workers: int = 1, text_field: str = "text",
               split: str = "train", max_doc_chars: int = 1_000_000, chunk_docs: int = 64,
               progress: bool = True) -> dict:
    """Write ``<dataset>.{bin,idx,stats.json}`` for ``<dataset> = dataset_prefix(output_prefix, text_field)``;
    returns the stats dict (prefix, documents, tokens, skipped counts by reason, split documents).
    Raises ``DataSourceError`` (writing nothing) when the input is missing or holds no usable document."""
    tok = load_tokenizer(tokenizer)  # fail fast, before any worker starts or any file is written
    skipped = Skips()
    texts = iter_texts(input, text_field, split, skipped)  # a missing or unsupported input raises here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns about missing Apex/TE on import
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    import torch
    from tqdm import tqdm

    prefix = dataset_prefix(output_prefix, text_field)
    stats = {"prefix": prefix, "documents": 0, "tokens": 0, "split_documents": 0}
    with _staged(prefix) as tmp:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
        chunks = _chunks(texts, chunk_docs)
        if workers > 1:
            results = _parallel_map(chunks, workers, tokenizer, max_doc_chars)
        else:
            _init_worker(tokenizer, max_doc_chars)
            results = map(_encode_chunk, chunks)
        try:
            with tqdm(desc="preprocess", unit="doc", disable=not progress, file=sys.stderr) as bar:
                for docs, n_split, n_empty in results:
                    for ids in docs:
                        builder.add_item(torch.from_numpy(ids))
                        builder.end_document()
                        stats["tokens"] += len(ids)
                    stats["documents"] += len(docs)
                    stats["split_documents"] += n_split
                    skipped["empty"] += n_empty
                    bar.update(len(docs))
        finally:
            builder.data_file.close()  # also on failure, before the temporary files are removed
        if stats["documents"] == 0:
            raise DataSourceError(f"--input '{input}' holds no usable documents (skipped: "
                                  f"{skipped.describe() or 'nothing'})")
        builder.finalize(tmp + ".idx")
        stats["skipped"] = {k: skipped[k] for k in ("empty", "undecodable", "malformed", "unsupported_file")
                            if skipped[k]}
        Path(tmp + ".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through _staged, which removes the temporary files


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m braid.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="jsonl/json-lines/parquet file, text directory or HF dataset")
    p.add_argument("--tokenizer", required=True, help="'bytes' or a local tokenizer path (as data.tokenizer)")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<text field>_document.{bin,idx,stats.json} (Megatron's names)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--text-field", default="text")
    p.add_argument("--split", default="train", help="split of a HF dataset")
    p.add_argument("--max-doc-chars", type=int, default=1_000_000, help="tokenize longer documents in pieces")
    args = p.parse_args(argv)
    for key in ("workers", "max_doc_chars"):
        if getattr(args, key) < 1:
            print(f"braid: error: --{key.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        stats = preprocess(args.input, args.tokenizer, args.output_prefix, args.workers, args.text_field,
                           args.split, args.max_doc_chars)
    except BraidError as exc:
        print(f"braid: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an unwritable --output-prefix: one line, not a traceback
        print(f"braid: error: {exc.filename or args.output_prefix}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{v} {k}" for k, v in stats["skipped"].items()) or "none"
    print(f"wrote {stats['prefix']}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens "
          f"(EOS included); skipped: {skipped}; split long documents: {stats['split_documents']}; "
          f"train on it with data.source={stats['prefix']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
