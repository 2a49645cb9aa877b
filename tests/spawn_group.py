"""Run one function on ``n`` gloo processes and return rank 0's result (a JSON-able dict).

Process start-up dominates small distributed tests, so a test module runs all its cases in one group
and caches the result per layout; each case is then its own test item reading the cache.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 240


@contextmanager
def rendezvous() -> Iterator[int]:
    """The port of a TCPStore that this (parent) process serves for the group's lifetime.

    The OS picks the port and the store keeps it bound, so no other process (a concurrent test, a
    background torchrun) can take it between choosing it and the ranks connecting, which a port
    found by binding to 0 and closing allows."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        yield store.port
    finally:
        del store


def join_group(rank: int, n: int, port: int) -> None:
    """In a spawned rank: join the gloo group whose store :func:`rendezvous` serves on ``port``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    # A rank that fails while the others wait in a collective must end the test, not hang it.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def leave_group() -> None:
    """End a spawned rank whose work is done: destroy its groups, then exit without interpreter teardown.

    Teardown destroys gloo's C++ objects in an order of its own; a worker thread still joinable then ends the
    process in ``std::terminate`` ("terminate called without an active exception", SIGABRT), which CI once
    hit after a test's results were already written. Called only on success, so a failing rank still
    exits through its exception."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _entry(rank: int, n: int, port: int, target: str, args: tuple, out_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    join_group(rank, n, port)
    try:
        module, name = target.rsplit(".", 1)
        result = getattr(importlib.import_module(module), name)(*args)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_group()


def run_group(n: int, target: str, *args) -> dict:
    """Call ``target`` (``"module.function"``, importable from tests/) with ``args`` on ``n`` ranks."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.json")
        with rendezvous() as port:
            mp.spawn(_entry, args=(n, port, target, args, path), nprocs=n, join=True)
        with open(path) as f:
            return json.load(f)
