"""Hugging Face streaming sources: online tokenization and packing, weighted mixing, exact resume.

Nothing is downloaded in full: ``datasets.load_dataset(..., streaming=True)`` yields records, which
are tokenized in small batches and packed exactly like ``PackedSequences`` (documents + EOS, sample
``i`` = stream tokens ``[iL, iL + L]``).

Sample order, dp-invariant. The stream is cut into ``data.stream_lanes`` = N independent *lanes*:
lane ``j`` reads the records ``split_dataset_by_node(ds, rank=j, world_size=N)`` gives it, holds out
every k-th of them for evaluation (k ≈ 1/valid_fraction, as ``split_documents``), and packs each
source separately, mixing sources sample by sample by weight (Megatron's greedy rule: the source
furthest below its share goes next). Global sample ``g`` lives in lane
``(g mod N·B) // B`` at lane position ``(g // N·B)·B + g mod B``, with ``B = global_batch / N``:
a global batch is N contiguous blocks, one per lane, so a data-parallel rank (a contiguous slice of
the global batch) reads only its own lanes when N is a multiple of dp. Everything depends on the
global sample index only, so the state is the trainer's consumed-samples count and a resume on any
dp sees the same samples in the same order. Reaching sample ``g`` after a restart replays its lane
from the start (re-tokenizing what was consumed: exact, but O(consumed) on resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from braid.config import DataConfig
from braid.data.loader import UNBOUNDED
from braid.data.tokenizer import Tokenizer
from braid.errors import DataSourceError

_HF_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def parse_stream_sources(source: str) -> list[tuple[str, float]]:
    """``[(name or file, weight)]`` from ``"src"``, ``"srcA srcB"`` (equal weights) or ``"w1 srcA w2 srcB"``."""
    parts = source.split()

    def number(s: str) -> Optional[float]:
        try:
            return float(s)
        except ValueError:
            return None

    if not parts:
        raise DataSourceError("config key 'data.source' is empty")
    if number(parts[0]) is None:
        return [(p, 1.0) for p in parts]
    if len(parts) % 2 or any(number(w) is None or number(w) <= 0 for w in parts[0::2]):
        raise DataSourceError(f"config key 'data.source' = '{source}': a streaming blend alternates weight "
                              f"(> 0) and source ('0.3 srcA 0.7 srcB')")
    return [(name, float(w)) for w, name in zip(parts[0::2], parts[1::2])]


def open_stream(spec: str, split: str):
    """A ``datasets.IterableDataset`` over a local file (by suffix) or a dataset name."""
    import datasets

    path = Path(spec).expanduser()
    try:
        if path.suffix in _HF_KINDS:
            if not path.exists():
                raise DataSourceError(f"config key 'data.source': '{spec}' does not exist")
            return datasets.load_dataset(_HF_KINDS[path.suffix], data_files=str(path), split="train",
                                         streaming=True)
        return datasets.load_dataset(spec, split=split, streaming=True)
    except DataSourceError:
        raise
    except Exception as exc:
        raise DataSourceError(f"config key 'data.source': '{spec}' could not be opened as a streaming dataset: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


class StreamPacker:
    """Documents in, ``PackedSequences``-identical samples out (dicts of ``[L]`` int64 arrays).

    Holds at most one sample plus one document of tokens. Document ids count up from 0 over the
    whole stream; positions continue across samples within a document, as ``PackedSequences``.
    """

    def __init__(self, eos_id: int, seq_len: int, reset_position_ids: bool):
        self.eos_id, self.seq_len, self.reset = eos_id, seq_len, reset_position_ids
        self.tokens = np.zeros(0, np.int64)
        self.docs = np.zeros(0, np.int64)
        self.positions = np.zeros(0, np.int64)
        self.n_docs = 0

    def add(self, ids: np.ndarray) -> None:
        n = len(ids) + 1
        self.tokens = np.concatenate([self.tokens, ids.astype(np.int64), [self.eos_id]])
        self.docs = np.concatenate([self.docs, np.full(n, self.n_docs, np.int64)])
        self.positions = np.concatenate([self.positions, np.arange(n, dtype=np.int64)])
        self.n_docs += 1

    def pop(self) -> Optional[dict[str, np.ndarray]]:
        """The next sample, or None until more documents are added."""
        L = self.seq_len
        if len(self.tokens) < L + 1:
            return None
        docs = self.docs[:L]
        sample = {
            "input_ids": self.tokens[:L].copy(),
            "labels": self.tokens[1 : L + 1].copy(),
            "doc_ids": docs - docs[0],
            "position_ids": self.positions[:L].copy() if self.reset else np.arange(L, dtype=np.int64),
        }
        # the last label is the next sample's first input: keep it
        self.tokens, self.docs, self.positions = self.tokens[L:], self.docs[L:], self.positions[L:]
        return sample


class _SourceLane:
    """One source's documents in one lane and split, tokenized in batches, packed; cycles epochs."""

    def __init__(self, spec: str, stream, cfg: DataConfig, tokenizer: Tokenizer, lane: int, n_lanes: int,
                 held_out: bool, batch_docs: int = 32):
        self.spec, self.stream, self.cfg, self.tok = spec, stream, cfg, tokenizer
        self.lane, self.n_lanes, self.held_out, self.batch_docs = lane, n_lanes, held_out, batch_docs
        self.k = max(2, round(1 / cfg.valid_fraction))
        self.packer = StreamPacker(tokenizer.eos_id, cfg.seq_len, cfg.reset_position_ids)
        self.docs: Iterator[np.ndarray] = self._documents()

    def _texts(self) -> Iterator[str]:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self.stream, rank=self.lane, world_size=self.n_lanes)
        for i, record in enumerate(ds):
            if (i % self.k == self.k // 2) != self.held_out:
                continue
            text = record.get(self.cfg.text_field)
            if isinstance(text, str) and text:  # malformed/empty records are skipped, not fatal
                yield text

    def _documents(self) -> Iterator[np.ndarray]:
        epoch_docs = -1
        while epoch_docs != 0:  # cycle epochs; stop if an epoch yields nothing
            epoch_docs, batch = 0, []
            for text in self._texts():
                batch.append(text)
                if len(batch) == self.batch_docs:
                    yield from self.tok.encode_batch(batch)
                    epoch_docs, batch = epoch_docs + len(batch), []
            if batch:
                yield from self.tok.encode_batch(batch)
                epoch_docs += len(batch)

    def next_sample(self) -> dict[str, np.ndarray]:
        while (sample := self.packer.pop()) is None:
            doc = next(self.docs, None)
            if doc is None:
                split = "held-out" if self.held_out else "training"
                raise DataSourceError(f"config key 'data.source': '{self.spec}' has no {split} documents for "
                                      f"lane {self.lane} of data.stream_lanes={self.n_lanes}")
            self.packer.add(doc)
        return sample


class _Lane:
    """A lane's mixed sample stream: sources chosen sample by sample by Megatron's greedy rule."""

    def __init__(self, sources: list[tuple[str, float]], make_source):
        total = sum(w for _, w in sources)
        self.weights = np.array([w / total for _, w in sources])
        self.sources = [make_source(spec) for spec, _ in sources]
        self.counts = np.zeros(len(sources), np.int64)
        self.position = 0  # lane samples produced so far

    def next_sample(self) -> dict[str, np.ndarray]:
        s = int(np.argmax(self.weights * (self.position + 1) - self.counts))  # ties → lowest index
        self.counts[s] += 1
        self.position += 1
        return self.sources[s].next_sample()


class StreamingSequences:
    """Random access by global sample index over a streamed, packed, mixed corpus.

    ``ds[g]`` is the dict of ``[seq_len]`` int64 arrays (``input_ids``, ``labels``, ``doc_ids``,
    ``position_ids``). Cheap for increasing ``g`` within a lane (the trainer's order); going back
    replays the lane. ``len`` is ``loader.UNBOUNDED`` (sources cycle epochs), which ``SampleOrder``
    reads in order. Without ``global_batch_size`` lanes are interleaved sample by sample (B = 1):
    still exact and dp-invariant, but every rank then reads every lane.
    """

    shuffle = False

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, held_out: bool = False,
                 global_batch_size: Optional[int] = None):
        self.cfg, self.tokenizer, self.held_out = cfg, tokenizer, held_out
        self.sources = parse_stream_sources(cfg.source)
        self.n_lanes = cfg.stream_lanes
        if global_batch_size is not None and global_batch_size % self.n_lanes:
            raise DataSourceError(f"config key 'data.stream_lanes' = {self.n_lanes} must divide "
                                  f"train.global_batch_size = {global_batch_size}")
        self.block = global_batch_size // self.n_lanes if global_batch_size else 1
        self.lanes: dict[int, _Lane] = {}
        self.streams: dict[str, object] = {}  # opened once: load_dataset resolves files each call
        self.last: dict[int, tuple[int, dict]] = {}  # lane → (position, sample) of its latest sample

    def __len__(self) -> int:
        return UNBOUNDED

    def lane_of(self, g: int) -> tuple[int, int]:
        """``(lane, position within the lane)`` of global sample ``g``."""
        round_size = self.block * self.n_lanes
        within = g % round_size
        return within // self.block, (g // round_size) * self.block + within % self.block

    def _new_lane(self, lane: int) -> _Lane:
        def source(spec: str) -> _SourceLane:
            if spec not in self.streams:
                self.streams[spec] = open_stream(spec, self.cfg.hf_split)
            return _SourceLane(spec, self.streams[spec], self.cfg, self.tokenizer, lane, self.n_lanes,
                               self.held_out)

        return _Lane(self.sources, source)

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        if g < 0:
            raise IndexError(g)
        lane, pos = self.lane_of(int(g))
        if lane in self.last and self.last[lane][0] == pos:
            return self.last[lane][1]
        if lane not in self.lanes or self.lanes[lane].position > pos:
            self.lanes[lane] = self._new_lane(lane)  # a fresh lane replays from its first sample
        stream = self.lanes[lane]
        while stream.position <= pos:
            sample = stream.next_sample()
        self.last[lane] = (pos, sample)
        return sample


def build_streaming_datasets(cfg: DataConfig, tokenizer: Tokenizer, global_batch_size: Optional[int] = None
                             ) -> tuple[StreamingSequences, StreamingSequences]:
    """Train and held-out ``StreamingSequences``; sources are opened now so a bad name fails early."""
    train = StreamingSequences(cfg, tokenizer, False, global_batch_size)
    valid = StreamingSequences(cfg, tokenizer, True, global_batch_size)
    for spec, _ in train.sources:
        train.streams[spec] = valid.streams[spec] = open_stream(spec, cfg.hf_split)
    return train, valid
