"""Tokenize a corpus into a Megatron indexed dataset (``<prefix>.bin`` / ``<prefix>.idx``).

    python -m braid.preprocess --input <file.jsonl|file.parquet|text dir|HF dataset> \\
        --tokenizer <bytes|path> --output-prefix <prefix> [--workers N]

Every document is followed by the tokenizer's EOS (braid recovers document boundaries from it).
Empty, undecodable and malformed records are skipped and counted; documents longer than
``--max-doc-chars`` are tokenized in pieces (cut at whitespace) and kept whole. The summary is
printed at the end and written to ``<prefix>.stats.json``. Writing uses megatron-core's
``IndexedDatasetBuilder`` (CPU only; imported lazily).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from braid.data.records import iter_texts, split_long_text
from braid.data.tokenizer import load_tokenizer
from braid.errors import BraidError

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


def preprocess(input: str, tokenizer: str, output_prefix: str, workers: int = 1, text_field: str = "text",
               split: str = "train", max_doc_chars: int = 1_000_000, chunk_docs: int = 64,
               progress: bool = True) -> dict:
    """Write ``output_prefix.{bin,idx,stats.json}``; returns the stats dict (documents, tokens,
    skipped counts by reason, split documents)."""
    tok = load_tokenizer(tokenizer)  # fail fast, before any worker starts or any file is written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns about missing Apex/TE on import
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    import torch
    from tqdm import tqdm

    skipped: Counter = Counter()
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(output_prefix + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    stats = {"documents": 0, "tokens": 0, "split_documents": 0}
    chunks = _chunks(iter_texts(input, text_field, split, skipped), chunk_docs)
    if workers > 1:
        results = _parallel_map(chunks, workers, tokenizer, max_doc_chars)
    else:
        _init_worker(tokenizer, max_doc_chars)
        results = map(_encode_chunk, chunks)
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
    builder.finalize(output_prefix + ".idx")
    stats["skipped"] = {k: skipped[k] for k in ("empty", "undecodable", "malformed", "unsupported_file")
                        if skipped[k]}
    Path(output_prefix + ".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m braid.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="jsonl/json-lines/parquet file, text directory or HF dataset")
    p.add_argument("--tokenizer", required=True, help="'bytes' or a local tokenizer path (as data.tokenizer)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, <prefix>.idx, <prefix>.stats.json")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--text-field", default="text")
    p.add_argument("--split", default="train", help="split of a HF dataset")
    p.add_argument("--max-doc-chars", type=int, default=1_000_000, help="tokenize longer documents in pieces")
    args = p.parse_args(argv)
    for key in ("workers", "max_doc_chars"):
        if getattr(args, key) < 1:
            print(f"braid.preprocess: --{key.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        stats = preprocess(args.input, args.tokenizer, args.output_prefix, args.workers, args.text_field,
                           args.split, args.max_doc_chars)
    except BraidError as exc:
        print(f"braid.preprocess: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{v} {k}" for k, v in stats["skipped"].items()) or "none"
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens "
          f"(EOS included); skipped: {skipped}; split long documents: {stats['split_documents']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
