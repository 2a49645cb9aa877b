"""The global sample order and its split into per-rank micro-batches.

The data state is one number, the count of consumed global samples, so a resume continues with the
very next sample even on a different number of data-parallel ranks.
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch

UNBOUNDED = sys.maxsize  # the length of a stream (braid.data.streaming): read in order, never permuted


class SampleOrder:
    """Global sample ``g`` → dataset index: epoch ``g // n`` is a permutation seeded by (seed, epoch).

    An ``UNBOUNDED`` dataset (a stream) is read in order: it has no random access to shuffle.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle and n < UNBOUNDED
        self._epoch: Optional[int] = None
        self._perm: Optional[np.ndarray] = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._epoch = epoch
        return self._perm

    def __call__(self, g: int) -> int:
        if not self.shuffle:  # no permutation to hold: n may be huge (a stream's sys.maxsize)
            return g % self.n
        return int(self._permutation(g // self.n)[g % self.n])


def collate(samples: list[dict[str, np.ndarray]], device: torch.device, with_doc_ids: bool) -> dict[str, torch.Tensor]:
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples])).to(device) for k in samples[0]}
    if not with_doc_ids:
        batch.pop("doc_ids")
    return batch


def rank_sample_ids(start: int, global_batch: int, dp_rank: int, dp_size: int) -> range:
    """Global sample ids of one global batch that belong to ``dp_rank`` (a contiguous slice)."""
    per_rank = global_batch // dp_size
    first = start + dp_rank * per_rank
    return range(first, first + per_rank)


def micro_batches(
    dataset,
    order: SampleOrder,
    start: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    device: torch.device,
    with_doc_ids: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of this rank for the global batch that begins at global sample ``start``.

    ``dataset`` is anything with ``dataset[i]`` → dict of ``[seq_len]`` int64 numpy arrays
    (``PackedSequences``, ``IndexedSequences``, ``StreamingSequences``); each batch value is ``[micro, seq_len]``.
    """
    ids = rank_sample_ids(start, global_batch, dp_rank, dp_size)
    out = []
    for m in range(0, len(ids), micro_batch):
        samples = [dataset[order(g)] for g in ids[m : m + micro_batch]]
        out.append(collate(samples, device, with_doc_ids))
    return out
