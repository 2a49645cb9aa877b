"""Pack documents into fixed-length training sequences, keeping document boundaries."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from braid.config import DataConfig
from braid.data.sources import load_documents
from braid.data.tokenizer import Tokenizer
from braid.errors import DataSourceError


class PackedSequences:
    """Documents, each followed by EOS, concatenated into one stream and cut into samples.

    Sample ``i`` covers stream positions ``[i·L, i·L + L]`` (L + 1 tokens: inputs and shifted labels),
    so consecutive samples share one token and no token is lost or repeated as an input.
    """

    def __init__(self, docs: Sequence[np.ndarray], eos_id: int, seq_len: int, reset_position_ids: bool):
        if not docs:
            raise DataSourceError("no documents to pack")
        lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
        dtype = np.uint16 if max(int(d.max(initial=0)) for d in docs) < 2**16 and eos_id < 2**16 else np.int32
        stream = np.empty(int(lengths.sum()), dtype=dtype)
        pos = 0
        for d in docs:
            stream[pos : pos + len(d)] = d
            stream[pos + len(d)] = eos_id
            pos += len(d) + 1
        self.tokens = stream
        self.doc_index = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
        self.doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.seq_len = seq_len
        self.reset_position_ids = reset_position_ids
        self.n_documents = len(docs)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s, L = i * self.seq_len, self.seq_len
        chunk = self.tokens[s : s + L + 1].astype(np.int64)
        docs = self.doc_index[s : s + L].astype(np.int64)
        if self.reset_position_ids:
            positions = np.arange(s, s + L) - self.doc_start[docs]
        else:
            positions = np.arange(L)
        return {
            "input_ids": chunk[:-1],
            "labels": chunk[1:],
            "doc_ids": docs - docs[0],
            "position_ids": positions.astype(np.int64),
        }


def split_documents(n: int, valid_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic held-out split: every k-th document (k ≈ 1/valid_fraction) is for evaluation."""
    if n < 2:
        raise DataSourceError(f"need at least 2 documents for a train/valid split, got {n}")
    k = max(2, round(1 / valid_fraction))
    valid = [i for i in range(n) if i % k == k // 2] or [n // 2]
    held = set(valid)
    return [i for i in range(n) if i not in held], valid


def split_tokens(tokens: np.ndarray, valid_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out split of a source that is one document (one text file), as nanoGPT splits its corpus:
    the last ``valid_fraction`` of the tokens, at least one sequence of ``seq_len``, is for evaluation;
    the tokens before it are for training. Both parts are packed as documents (EOS after each)."""
    n_valid = min(len(tokens), max(seq_len, round(len(tokens) * valid_fraction)))
    return tokens[: len(tokens) - n_valid], tokens[len(tokens) - n_valid :]


def build_datasets(cfg: DataConfig, tokenizer: Tokenizer, progress: bool = False, batch_docs: int = 256, *,
                   seed: int = 1234, num_samples: Optional[int] = None, cache_dir: Optional[str] = None,
                   global_batch_size: Optional[int] = None):
    """Train and valid datasets for the data config, each with ``len`` and ``ds[i]`` → dict of ``[seq_len]``
    int64 arrays (``input_ids``, ``labels``, ``doc_ids``, ``position_ids``).

    - ``data.streaming``: ``StreamingSequences`` (read in order; ``global_batch_size`` places lanes).
    - an indexed prefix or a Megatron blend: megatron-core ``IndexedSequences`` (``seed`` shuffles,
      ``num_samples`` sizes a weighted blend, ``cache_dir`` overrides ``data.cache_dir``).
    - anything else (embedded, local files, a HF dataset name): in-memory ``PackedSequences``.
    """
    if cfg.streaming:
        from braid.data.streaming import build_streaming_datasets

        return build_streaming_datasets(cfg, tokenizer, global_batch_size)
    from braid.data.indexed import build_indexed_datasets, parse_blend

    blend = parse_blend(cfg.source)
    if blend is not None:
        return build_indexed_datasets(cfg, tokenizer, blend, seed, num_samples, cache_dir)
    docs = load_documents(cfg.source, cfg.text_field, cfg.hf_split)
    texts = [text for _, text in docs]
    from tqdm import tqdm

    tokens: list[np.ndarray] = []
    for start in tqdm(range(0, len(texts), batch_docs), desc="tokenizing", unit="batch",
                      disable=not progress, leave=False, delay=2.0):
        tokens.extend(tokenizer.encode_batch(texts[start : start + batch_docs]))
    if len(tokens) == 1:  # one text file: no second document to hold out, so hold out its tail
        train_docs, valid_docs = [[part] for part in split_tokens(tokens[0], cfg.valid_fraction, cfg.seq_len)]
    else:
        train_idx, valid_idx = split_documents(len(tokens), cfg.valid_fraction)
        train_docs, valid_docs = [tokens[i] for i in train_idx], [tokens[i] for i in valid_idx]
    train = PackedSequences(train_docs, tokenizer.eos_id, cfg.seq_len, cfg.reset_position_ids)
    valid = PackedSequences(valid_docs, tokenizer.eos_id, cfg.seq_len, cfg.reset_position_ids)
    if len(tokens) == 1 and len(train) == 0:
        raise DataSourceError(f"data.source '{cfg.source}' is one document of {len(tokens[0])} tokens: too short to "
                              f"hold out a sequence of data.seq_len={cfg.seq_len} tokens and train on another")
    for name, ds in (("training", train), ("held-out", valid)):
        if len(ds) == 0:
            raise DataSourceError(f"data.source '{cfg.source}': the {name} split is shorter than "
                                  f"data.seq_len={cfg.seq_len} tokens")
    return train, valid
