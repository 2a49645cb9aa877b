"""Two torchrun launchers on one machine (--nnodes 2, one worker each) train and match a single
launcher of two workers: the same ranks and batches, so the same losses to the last bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_overrides

TORCHRUN = ROOT / "launch" / "torchrun.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _args(run_dir) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), *tiny_overrides(run_dir, **{"train.steps": 4})]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "BRAID_RDZV_ID": f"test-{os.getpid()}"}


@pytest.fixture(scope="module")
def single_launcher(tmp_path_factory):
    """``launch/torchrun.sh --nproc 2``: one node, two workers; its losses and console output."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    res = subprocess.run(["bash", str(TORCHRUN), "--nproc", "2", *_args(run_dir)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "| 2 rank(s) on 1 node(s), cpu |" in res.stdout + res.stderr
    return _losses(run_dir)


@pytest.mark.parametrize("static_ranks", [True, False], ids=["node-rank", "c10d"])
def test_two_launchers_match_one_launcher(tmp_path, static_ranks, single_launcher):
    endpoint = f"127.0.0.1:{_free_port()}"
    launchers = []
    for rank in range(2):
        topo = ["--nnodes", "2", "--rdzv-endpoint", endpoint, "--nproc", "1"]
        if static_ranks:
            topo += ["--node-rank", str(rank)]
        launchers.append(subprocess.Popen(["bash", str(TORCHRUN), *topo, *_args(tmp_path / "two")], cwd=ROOT,
                                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in launchers]
    assert all(p.returncode == 0 for p in launchers), outs[0][-2000:] + outs[1][-2000:]
    assert "| 2 rank(s) on 2 node(s), cpu |" in "".join(outs)
    assert _losses(tmp_path / "two") == pytest.approx(single_launcher, rel=1e-5)
