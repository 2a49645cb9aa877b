"""Shared fixtures: a tiny, fast config on a small local corpus."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests must not depend on the machine's thread count or talk to wandb servers.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
# Triton picks interpreted vs compiled once per process (at import); the CPU kernel tests need the
# interpreter, and some test modules import triton indirectly (megatron-core) at collection time.
import torch  # noqa: E402  (after the environment above; triton is not imported by torch itself)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poison(monkeypatch):
    """Every float tensor from torch.empty / empty_like starts as NaN, so unwritten outputs fail."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))


def tiny_overrides(run_dir: Path, **extra) -> list[str]:
    """A 2-layer, 64-wide model on the embedded corpus, 32-token sequences: ~20 ms per step."""
    base = {
        "run.dir": str(run_dir),
        "model.preset": "tiny",
        "model.d_model": 64,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.pattern": "AA",
        "data.seq_len": 32,
        "train.steps": 10,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.eval_interval": 5,
        "train.eval_iters": 1,
        "train.threads": 1,
        "checkpoint.interval": 5,
        "checkpoint.keep": 10,
        "logging.interval": 1,
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


@pytest.fixture
def python() -> str:
    return sys.executable
