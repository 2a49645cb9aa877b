"""Two torchrun launchers on one machine (--nnodes 2) train and match a single process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("static_ranks", [True, False], ids=["node-rank", "c10d"])
def test_two_launchers_match_one_process(tmp_path, static_ranks):
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), *tiny_overrides(tmp_path / "two", **{"train.steps": 4})]
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHON": sys.executable, "BRAID_RDZV_ID": f"test-{os.getpid()}"}
    launchers = []
    for rank in range(2):
        topo = ["--nnodes", "2", "--rdzv-endpoint", endpoint, "--nproc", "1"]
        if static_ranks:
            topo += ["--node-rank", str(rank)]
        launchers.append(subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), *topo, *args], cwd=ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in launchers]
    assert all(p.returncode == 0 for p in launchers), outs[0][-2000:] + outs[1][-2000:]
    assert "2 rank(s)" in "".join(outs)

    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "braid.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                    *tiny_overrides(one, **{"train.steps": 4})], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(one), rel=1e-5)
