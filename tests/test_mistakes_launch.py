"""Launcher mistakes a user types: ``launch/torchrun.sh --nproc 2 ... <bad layout>`` prints one
``braid: error:`` line naming the key, exits 2, shows no traceback and no torchrun ChildFailedError
dump, and leaves the existing run directory it points at byte-identical.

The layout cases are caught before any rank starts (cheap: no torch); the data case can only fail in
the started ranks, so it is slow: there the launcher reports the ranks' line once and exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from mistakes import Mistake, finished_run, run_mistake

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step run (config, metrics, a checkpoint): what a mistaken launch must not touch."""
    return finished_run(tmp_path_factory.mktemp("mistakes_launch"))


def launch(*args: str) -> list[str]:
    """``launch/torchrun.sh <args>`` as a user types it, from the repository root (run.dir is added)."""
    return ["launch/torchrun.sh", *args]


TWO = ["--nproc", "2", "--config", "configs/tiny.yaml"]
# (name, launcher arguments, what the one line must name)
LAYOUT_MISTAKES = [
    ("tp=3 on 2 ranks", [*TWO, "parallel.tp=3"], "'parallel.tp' = 3 does not divide the world size 2"),
    ("dp=4 on 2 ranks", [*TWO, "parallel.dp=4", "train.global_batch_size=32"], "'parallel.dp' = 4 contradicts"),
    ("cp=2, seq_len 255", [*TWO, "parallel.cp=2", "data.seq_len=255"], "'data.seq_len' = 255 must be a multiple of 4"),
    ("ep=3 on 2 ranks", [*TWO, "parallel.ep=3"], "'parallel.ep' = 3"),
    ("deepspeed with tp", [*TWO, "parallel.engine=deepspeed", "parallel.tp=2"], "'parallel.engine' = 'deepspeed'"),
    ("batch too small for 2 ranks", TWO, "'train.global_batch_size' = 8"),
    # nnodes × nproc ranks: the check sees the whole job's world before any rendezvous is tried.
    ("tp=3 on 2 nodes × 2", ["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "127.0.0.1:9", *TWO,
                             "parallel.tp=3"], "world size 4"),
]


@pytest.mark.parametrize("name,args,names", LAYOUT_MISTAKES, ids=[c[0] for c in LAYOUT_MISTAKES])
def test_layout_mistakes_stop_before_any_rank(run_dir: Path, name: str, args: list[str], names: str):
    line = run_mistake(Mistake(name, launch(*args, f"run.dir={run_dir}"), names, shell=True), guard=run_dir,
                       timeout=60)
    assert line.startswith("braid: error: config key"), line


@pytest.mark.slow  # two real ranks start (torch, the trainer) before the data source fails: ~15 s on 2 cores
def test_a_rank_error_is_reported_once(run_dir: Path, tmp_path: Path):
    missing = tmp_path / "no-such-corpus.jsonl"
    fresh = tmp_path / "fresh"  # a new run: the existing one's checkpoints would refuse the model first
    args = [*TWO, "train.global_batch_size=16", f"data.source={missing}", f"run.dir={fresh}"]
    run_mistake(Mistake("missing data source", launch(*args), str(missing), shell=True), guard=fresh)
