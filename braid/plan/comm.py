"""Collective times by algorithm, on NVLink/NVSwitch within a node and InfiniBand across nodes.

A group of ``n`` ranks whose members sit in ``nodes`` > 1 nodes runs at the slower link per GPU (its
inter-node bandwidth: every GPU has its own NIC, so a ring crossing nodes is limited by the NIC);
within one node it runs at NVLink bandwidth. Bandwidth terms are the classic ones (Thakur et al. 2005;
NCCL's "bus bandwidth"): with ``B`` the bytes of the full buffer,

- ring all-reduce: ``2 (n−1)/n · B / bw`` plus ``2 (n−1)`` latency steps;
- tree all-reduce (NCCL's double binary tree): ``2 B / bw`` plus ``2 log2 n`` latency steps;
- all-gather / reduce-scatter (ring): ``(n−1)/n · B / bw`` plus ``n−1`` steps (B: the gathered buffer);
- all-to-all: ``(n−1)/n · B / bw`` plus ``n−1`` steps (B: what one rank holds before the exchange);
- P2P: ``B / bw`` plus one step.

``bw`` is the link bandwidth times the GPU kind's achievable fraction (``nvlink`` / ``ib`` in the
efficiency file). All-reduce picks the faster of ring and tree, as NCCL does by message size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from braid.plan.hardware import GPU


@dataclass(frozen=True)
class Links:
    gpu: GPU
    gpus_per_node: int
    nvlink_eff: float
    ib_eff: float

    def bw_lat(self, span: int) -> tuple[float, float]:
        """(bytes/s, s per step) of a group whose members span ``span`` consecutive ranks."""
        if span <= self.gpus_per_node:
            return self.gpu.intra_bw * self.nvlink_eff, self.gpu.intra_latency
        return self.gpu.inter_bw * self.ib_eff, self.gpu.inter_latency


def collective_time(op: str, nbytes: float, n: int, links: Links, span: int) -> float:
    """Seconds of one collective ``op`` over ``n`` ranks spanning ``span`` consecutive ranks."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = links.bw_lat(span)
    if op == "all_reduce":
        ring = 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat
        tree = 2 * nbytes / bw + 2 * math.log2(n) * lat
        return min(ring, tree)
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n * nbytes / bw + (n - 1) * lat
    if op == "p2p":
        return nbytes / bw + lat
    raise ValueError(f"unknown collective {op!r}")


def sent_time(sent_bytes: float, steps: int, links: Links, span: int) -> float:
    """Seconds for one rank to send ``sent_bytes`` in ``steps`` messages (the CP formulas count bytes sent)."""
    if sent_bytes <= 0:
        return 0.0
    bw, lat = links.bw_lat(span)
    return sent_bytes / bw + steps * lat
