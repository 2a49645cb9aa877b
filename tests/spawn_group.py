"""Run one function on ``n`` gloo processes and return rank 0's result (a JSON-able dict).

Process start-up dominates small distributed tests, so a test module runs all its cases in one group
and caches the result per layout; each case is then its own test item reading the cache.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import tempfile

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, n: int, port: int, target: str, args: tuple, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A rank that fails while the others wait in a collective must end the test, not hang it.
    dist.init_process_group("gloo", rank=rank, world_size=n, timeout=datetime.timedelta(seconds=240))
    try:
        module, name = target.rsplit(".", 1)
        result = getattr(importlib.import_module(module), name)(*args)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_group(n: int, target: str, *args) -> dict:
    """Call ``target`` (``"module.function"``, importable from tests/) with ``args`` on ``n`` ranks."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.json")
        mp.spawn(_entry, args=(n, free_port(), target, args, path), nprocs=n, join=True)
        with open(path) as f:
            return json.load(f)
