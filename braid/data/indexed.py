"""Megatron indexed datasets (``.bin``/``.idx``) and blends of them, read through megatron-core.

``data.source`` names one prefix (``/data/web_text_document``) or a Megatron blend, weights and
prefixes alternating (``"0.3 /data/a_text_document 0.7 /data/b_text_document"``). megatron-core's
``BlendedMegatronDatasetBuilder`` builds the train/valid ``GPTDataset``s (and the ``BlendedDataset``
over them) and caches their shuffled document/sample indices as ``.npy`` files in ``data.cache_dir``
(default: megatron-core's ``cache/`` folder next to the data). GPTDataset gives no document ids, so
they are recomputed from the EOS tokens that ``braid.preprocess`` appends to every document.

megatron-core is imported lazily: importing it costs seconds and most runs do not need it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from braid.config import DataConfig
from braid.data.indexed_check import check_pair, document_count, half_pair_problem
from braid.data.tokenizer import Tokenizer
from braid.errors import DataSourceError

IGNORE_INDEX = -100  # the loss's ignore label (braid.models), for megatron-core's padded positions


def is_indexed_prefix(path: str) -> bool:
    """True when ``path.bin`` and ``path.idx`` both exist."""
    return Path(path + ".bin").is_file() and Path(path + ".idx").is_file()


def parse_blend(source: str) -> Optional[tuple[list[str], Optional[list[float]]]]:
    """``(prefixes, weights)`` when ``source`` is an indexed prefix or a Megatron blend, else None.

    Accepted: ``"prefix"``, ``"prefixA prefixB"`` (weights from their sizes, weights = None) and
    ``"w1 prefixA w2 prefixB"``. A blend naming a missing prefix, half a pair (``.bin`` without
    ``.idx``, or the prefix given with its suffix) or a pair whose ``.idx`` does not describe its
    ``.bin`` raises ``DataSourceError``.
    """
    parts = source.split()
    if not parts:
        return None
    if len(parts) == 1:
        problem = half_pair_problem(parts[0])
        if problem:
            raise DataSourceError(problem)
        if not is_indexed_prefix(parts[0]):
            return None
        check_pair(parts[0])
        return [parts[0]], None

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if is_number(parts[0]):
        if len(parts) % 2:
            raise DataSourceError(f"config key 'data.source' = '{source}': a blend alternates weight and "
                                  f"prefix ('0.3 prefixA 0.7 prefixB'), got an odd number of items")
        weights, prefixes = parts[0::2], parts[1::2]
        if not all(is_number(w) for w in weights) or any(is_number(p) for p in prefixes):
            raise DataSourceError(f"config key 'data.source' = '{source}': a blend alternates weight and "
                                  f"prefix ('0.3 prefixA 0.7 prefixB')")
        w = [float(x) for x in weights]
        if any(x <= 0 for x in w):
            raise DataSourceError(f"config key 'data.source' = '{source}': blend weights must be > 0")
        parsed: tuple[list[str], Optional[list[float]]] = (prefixes, w)
    else:
        parsed = (parts, None)
    for p in parsed[0]:
        problem = half_pair_problem(p)
        if problem:
            raise DataSourceError(problem)
        if not is_indexed_prefix(p):
            raise DataSourceError(f"config key 'data.source': indexed dataset '{p}' not found "
                                  f"(need {p}.bin and {p}.idx)")
        check_pair(p)
    return parsed


class MegatronTokenizerAdapter:
    """The attributes megatron-core's GPTDataset reads from a tokenizer: ``eod``, ``vocab_size`` and
    ``unique_identifiers`` (part of its cache hash). No ``pad``: megatron-core then pads with -1,
    which no real token has."""

    def __init__(self, tokenizer: Tokenizer):
        self.eod = int(tokenizer.eos_id)
        self.vocab_size = int(tokenizer.vocab_size)
        self.unique_identifiers = {"class": "braid", "name": str(getattr(tokenizer, "name", "")),
                                   "eod": self.eod, "vocab_size": self.vocab_size}


def doc_ids_from_eos(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """``[T]`` int64: 0 for the first document of a sample, +1 at the token after each EOS."""
    ends = (input_ids[:-1] == eos_id).astype(np.int64)
    return np.concatenate([[0], np.cumsum(ends)])


def positions_from_doc_ids(doc_ids: np.ndarray) -> np.ndarray:
    """``[T]`` int64 position of each token within its document (the first document starts at 0)."""
    t = np.arange(len(doc_ids))
    starts = np.flatnonzero(np.diff(doc_ids, prepend=-1))
    return t - np.repeat(starts, np.diff(np.append(starts, len(doc_ids))))


class IndexedSequences:
    """A megatron-core GPT/Blended dataset seen as braid samples.

    ``ds[i]`` is a dict of ``[seq_len]`` int64 numpy arrays ``input_ids``, ``labels``, ``doc_ids`` and
    ``position_ids``, like ``PackedSequences``. Positions restart after each EOS when
    ``reset_position_ids`` (the sample's first, possibly partial, document starts at 0 as in
    Megatron), else ``0..T-1``. megatron-core already shuffles samples within its epoch.
    """

    def __init__(self, dataset, eos_id: int, reset_position_ids: bool):
        self.dataset = dataset
        self.eos_id = eos_id
        self.reset_position_ids = reset_position_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        sample = self.dataset[int(i)]
        input_ids = sample["tokens"].numpy().astype(np.int64)
        labels = sample["labels"].numpy().astype(np.int64)
        labels[sample["loss_mask"].numpy() == 0] = IGNORE_INDEX  # megatron-core's padding
        doc_ids = doc_ids_from_eos(input_ids, self.eos_id)
        positions = positions_from_doc_ids(doc_ids) if self.reset_position_ids else np.arange(len(input_ids))
        return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids,
                "position_ids": positions.astype(np.int64)}


@contextlib.contextmanager
def _process_group_for_megatron():
    """A one-process gloo group while megatron-core builds, when none exists.

    megatron-core 0.16's BlendedDataset calls ``torch.distributed.get_rank()`` unguarded when it
    writes its cache, so a weighted blend fails in a single process without a process group.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _valid_per_mille(valid_fraction: float) -> int:
    return max(1, round(1000 * valid_fraction))


def _split_string(valid_fraction: float) -> str:
    """Megatron's ``split`` ("train,valid,test" weights per 1000) for the held-out fraction."""
    valid = _valid_per_mille(valid_fraction)
    return f"{1000 - valid},{valid},0"


def _explain_empty_split(prefixes: list[str], valid_fraction: float) -> None:
    """Raise naming the prefix when an empty split comes from megatron-core's whole-document split."""
    train_end = (1000 - _valid_per_mille(valid_fraction)) / 1000  # as megatron-core's split matrix
    for p in prefixes:
        n = document_count(p)
        n_train = int(round(train_end * n))
        if n < 2:
            raise DataSourceError(f"config key 'data.source': indexed dataset '{p}' holds {n} document, and "
                                  f"megatron-core holds out whole documents (preprocess more documents, or give "
                                  f"data.source the text file itself: one file is split by token position)")
        if n_train in (0, n):
            raise DataSourceError(f"config key 'data.source': indexed dataset '{p}' holds {n} document(s) and "
                                  f"megatron-core splits by whole documents: data.valid_fraction={valid_fraction} "
                                  f"leaves {'no held-out' if n_train == n else 'no training'} document (change "
                                  f"data.valid_fraction or add documents)")


def build_indexed_datasets(cfg: DataConfig, tokenizer: Tokenizer, blend: tuple[list[str], Optional[list[float]]],
                           seed: int = 1234, num_samples: Optional[int] = None,
                           cache_dir: Optional[str] = None) -> tuple[IndexedSequences, IndexedSequences]:
    """Train and valid ``IndexedSequences`` for an indexed prefix or blend.

    Args:
        blend: ``(prefixes, weights or None)`` from ``parse_blend``.
        seed: megatron-core's shuffling seed (part of the cache key).
        num_samples: training samples to draw (the valid split gets ``valid_fraction`` of it, at
            least 1). Default: one epoch of each split; a weighted blend needs a size and gets
            ``sum(tokens) // seq_len``.
        cache_dir: overrides ``data.cache_dir`` for the cached indices.
    Must be called on every rank (megatron-core builds the cache on rank 0, others wait).
    """
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns about missing Apex/TE on import
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, weights = blend
    if num_samples is None and weights is not None:  # a weighted blend needs a size: every token once
        total = 0
        for p in prefixes:
            low = IndexedDataset(p)  # keep it alive while reading: its __del__ unmaps the index
            total += int(low.sequence_lengths.sum())
            del low
        num_samples = max(1, total // cfg.seq_len)
    # No size and no weights: megatron-core builds exactly one epoch of each split.
    sizes = [None, None, None] if num_samples is None else \
        [num_samples, max(1, round(num_samples * cfg.valid_fraction)), 0]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=cfg.seq_len,
        blend=(prefixes, weights),
        split=_split_string(cfg.valid_fraction),
        path_to_cache=cache_dir or cfg.cache_dir or None,
        tokenizer=MegatronTokenizerAdapter(tokenizer),
        reset_position_ids=False,  # recomputed from EOS here, with braid's doc_ids
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    with warnings.catch_warnings(), _process_group_for_megatron():
        warnings.simplefilter("ignore")
        try:
            train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        except (AssertionError, ValueError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataSourceError(f"config key 'data.source' = '{cfg.source}': megatron-core could not build "
                                  f"the datasets: {reason}") from None
    for name, ds in (("training", train), ("held-out", valid)):
        if ds is None or len(ds) == 0:
            _explain_empty_split(prefixes, cfg.valid_fraction)
            raise DataSourceError(f"config key 'data.source' = '{cfg.source}': the {name} split holds no "
                                  f"sequence of data.seq_len={cfg.seq_len} tokens")
    return (IndexedSequences(train, tokenizer.eos_id, cfg.reset_position_ids),
            IndexedSequences(valid, tokenizer.eos_id, cfg.reset_position_ids))
