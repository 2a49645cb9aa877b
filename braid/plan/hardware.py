"""GPU kinds the planner knows: peak dense bf16 tensor FLOP/s, HBM size and bandwidth, and the link
bandwidths per GPU (one direction) within a node (NVLink through NVSwitch) and across nodes (InfiniBand).

Sources (vendor datasheets, dense figures, i.e. without 2:4 sparsity):
- h100-sxm: NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989.4 TFLOP/s bf16, 80 GB HBM3 at 3.35 TB/s,
  NVLink 4 900 GB/s bidirectional (450 GB/s each way); DGX H100: 8 × ConnectX-7 400 Gb/s (50 GB/s per GPU).
- h200: NVIDIA H200 datasheet (SXM): same compute as H100 SXM, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s
  bidirectional; HGX H200 nodes ship 400 Gb/s per GPU.
- a100-80gb: NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s bf16, 80 GB HBM2e at 2.039 TB/s, NVLink 3
  600 GB/s bidirectional; DGX A100 / Selene: 8 × HDR 200 Gb/s (25 GB/s per GPU).
- b200: NVIDIA DGX B200 datasheet (72 PFLOP/s fp8 training and 1,440 GB for 8 GPUs): 2.25 PFLOP/s dense
  bf16, 180 GB HBM3e at 8 TB/s, NVLink 5 1.8 TB/s bidirectional; 8 × ConnectX-7 400 Gb/s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from braid.errors import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    intra_bw: float  # bytes/s per GPU, one direction, within a node
    inter_bw: float  # bytes/s per GPU, one direction, across nodes
    intra_latency: float = 5e-6  # s per collective step (NCCL over NVLink)
    inter_latency: float = 15e-6  # s per collective step (NCCL over IB)


GB = 1e9
GPUS: dict[str, GPU] = {
    "h100-sxm": GPU("h100-sxm", 989.4e12, 80 * GB, 3.35e12, 450 * GB, 50 * GB),
    "h200": GPU("h200", 989.4e12, 141 * GB, 4.8e12, 450 * GB, 50 * GB),
    "a100-80gb": GPU("a100-80gb", 312e12, 80 * GB, 2.039e12, 300 * GB, 25 * GB),
    "b200": GPU("b200", 2250e12, 180 * GB, 8e12, 900 * GB, 50 * GB),
}


def gpu_kind(name: str, intra_bw: Optional[float] = None, inter_bw: Optional[float] = None,
             memory_bytes: Optional[float] = None) -> GPU:
    """The named kind, with link bandwidths (GB/s, one direction) or memory overridden when given."""
    if name not in GPUS:
        raise ConfigError(f"--gpu {name!r} is not a known GPU kind: {', '.join(GPUS)}")
    g = GPUS[name]
    if intra_bw is not None:
        g = replace(g, intra_bw=intra_bw * GB)
    if inter_bw is not None:
        g = replace(g, inter_bw=inter_bw * GB)
    if memory_bytes is not None:
        g = replace(g, hbm_bytes=memory_bytes)
    return g
