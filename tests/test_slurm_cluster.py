"""launch/slurm.sbatch on a real Slurm: the local two-node cluster of launch/slurm_cluster/ (nodes n1
and n2, both at 127.0.0.1). A job of 2 nodes x 2 workers trains like a single-node 4-process torchrun;
a job with a 2-minute time limit gets Slurm's USR1 warning, checkpoints, requeues itself and finishes
from its checkpoint like an uninterrupted 2-process torchrun.

Skipped, with the command that fixes it, where that cluster is not installed or not running; CI
(.ci/run) brings it up, so there these tests always run. Each reference run shares the job's worker
layout (ranks, micro batch), so the metrics agree to the last bit (1e-5 is asserted); a 1-process
reference would drift by ~1e-3 over the time-limit test's 1200 steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides

SBATCH = ROOT / "launch" / "slurm.sbatch"
TORCHRUN = ROOT / "launch" / "torchrun.sh"
CLUSTER_SCRIPTS = ROOT / "launch" / "slurm_cluster"
CLUSTER_NAME = "braid-local"  # ClusterName in the slurm.conf that launch/slurm_cluster/up.sh writes
JOB_TIMEOUT_S = 300  # queueing behind another session's job included
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

# The time-limit test. slurmctld checks time limits every 30 s, so `--time=2 --signal=B:USR1@60`
# (warn 60 s before a 2-minute limit) delivers USR1 30-60 s after each attempt starts. Training must
# outlast the first warning: 1200 steps took ~70 s on one machine while the reference trained beside
# the job, but under 60 s on a faster one, which finished before the warning (CI failed so); 2400
# leave attempt 1 interrupted on a machine twice as fast. A later attempt may be warned again; the
# test accepts any number of requeues, each of which must resume where the last stopped.
PREEMPT_STEPS = 2400
PREEMPT_TIMEOUT_S = 600


def _cluster_problem() -> str | None:
    """Why the local cluster cannot take jobs, or None when it can."""
    up = "sudo launch/slurm_cluster/up.sh"
    if shutil.which("sbatch") is None:
        return f"slurm is not installed: run sudo launch/slurm_cluster/install.sh && {up}"
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return f"slurmctld does not answer: run {up}"
    if config.returncode != 0 or nodes.returncode != 0:
        return f"the local slurm cluster is not running: run {up}"
    # Never send test jobs to a real cluster this machine happens to be a client of.
    if not re.search(rf"^ClusterName\s*=\s*{CLUSTER_NAME}$", config.stdout, re.M):
        return f"slurm here is not the local '{CLUSTER_NAME}' cluster of launch/slurm_cluster/up.sh"
    states = dict(line.split() for line in nodes.stdout.splitlines() if line.strip())
    usable = {"idle", "mix", "alloc", "comp"}
    if not all(states.get(n, "").rstrip("*~#") in usable for n in ("n1", "n2")):
        return f"nodes n1, n2 are not both up ({states}): run {up}"
    return None


_problem = _cluster_problem()
needs_cluster = pytest.mark.skipif(_problem is not None, reason=str(_problem))


def _job_env(nproc_per_node: int = 1) -> dict[str, str]:
    # sbatch exports this environment into the job. Drop SLURM_* so that a pytest which itself
    # runs inside a Slurm job does not hand its own allocation's variables to the test job.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, NPROC_PER_NODE=str(nproc_per_node))
    return env



def run_overrides(run_dir: Path, steps: int, **extra) -> list[str]:
    return tiny_overrides(run_dir, **{"train.steps": steps, "train.eval_interval": 10 * steps,
                                      "checkpoint.interval": 10 * steps, **extra})


def submit(out_dir: Path, train_args: list[str], *sbatch_flags: str, nproc_per_node: int) -> int:
    """``sbatch -N 2 [flags] launch/slurm.sbatch --config configs/tiny.yaml <train_args>``; the job id."""
    cmd = ["sbatch", "--parsable", "-N", "2", "--time=10", "--job-name=braid-test", f"--chdir={ROOT}",
           f"--output={out_dir}/job-%j.out", *sbatch_flags, str(SBATCH), "--config", "configs/tiny.yaml", *train_args]
    res = subprocess.run(cmd, env=_job_env(nproc_per_node), capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, TimeLimit, ...)."""
    res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                         timeout=10)
    assert res.returncode == 0, res.stderr
    return dict(field.split("=", 1) for field in res.stdout.split() if "=" in field)


def wait_for_end(job_id: int, log: Path, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.time() + timeout_s
    while (info := job_info(job_id))["JobState"] not in TERMINAL:
        assert time.time() < deadline, f"job {job_id} still {info['JobState']}\n" + _tail(log)
        time.sleep(0.5)
    return info


def _tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text().splitlines()[-n:]) if log.is_file() else "(no job log)"


# What must not depend on how the run was launched or interrupted (timings and throughput may).
COMPARED = ("loss", "grad_norm", "lr", "consumed_samples", "skipped_iterations", "nan_iterations", "eval_loss")


def metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: the COMPARED fields of that step's train and eval records}."""
    path = run_dir / "metrics.jsonl"
    out: dict[int, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update({k: rec[k] for k in COMPARED if k in rec})
    return out


class TorchrunReference:
    """The uninterrupted single-node run: ``launch/torchrun.sh --nproc N`` with the job's arguments,
    started in the background so that it trains while the job is queued, starting or requeued."""

    def __init__(self, run_dir: Path, nproc: int, train_args: list[str], steps: int):
        self.run_dir, self.steps = run_dir, steps
        self.log = run_dir.parent / "reference.log"  # a file, not a pipe nobody drains meanwhile
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(["bash", str(TORCHRUN), "--nproc", str(nproc), "--config", "configs/tiny.yaml",
                                          *train_args], cwd=ROOT, env=_job_env(), stdout=out, stderr=subprocess.STDOUT)

    def metrics(self) -> dict[int, dict]:
        self.proc.wait(timeout=JOB_TIMEOUT_S)
        assert self.proc.returncode == 0, _tail(self.log)
        got = metrics(self.run_dir)
        assert sorted(got) == list(range(1, self.steps + 1)), _tail(self.log)
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # torchrun.sh execs torchrun, whose workers die with their agent
            self.proc.wait()


@pytest.fixture
def cleanup():
    """Lists of jobs and references to end at teardown: a failed test leaves nothing running."""
    jobs: list[int] = []
    refs: list[TorchrunReference] = []
    yield jobs, refs
    for job_id in jobs:
        subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
    for ref in refs:
        ref.stop()


def head_node_addr() -> str:
    out = subprocess.run(["scontrol", "show", "node", "n1"], capture_output=True, text=True, timeout=10).stdout
    return re.search(r"NodeAddr=(\S+)", out).group(1)


def assert_matches(got: dict[int, dict], ref: dict[int, dict]) -> None:
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step


@pytest.mark.parametrize("script", ["install.sh", "up.sh", "down.sh"])
def test_cluster_scripts_parse_and_are_executable(script: str):
    path = CLUSTER_SCRIPTS / script
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert os.access(path, os.X_OK)


@needs_cluster
def test_cluster_runs_one_task_on_each_node():
    res = subprocess.run(["srun", "-N", "2", "--ntasks-per-node=1", "--time=1", "bash", "-c",
                          "echo $SLURMD_NODENAME"], env=_job_env(), capture_output=True, text=True,
                         timeout=JOB_TIMEOUT_S)
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == ["n1", "n2"]


@needs_cluster
@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_two_nodes_of_two_processes_match_a_four_process_torchrun(tmp_path, cleanup):
    """The issue's acceptance shape: 2 nodes x 2 workers = 4 ranks, micro batch 1, global batch 4,
    against one node of 4 workers (`launch/torchrun.sh --nproc 4`) with the same arguments."""
    jobs, refs = cleanup
    steps = 12
    args = run_overrides(tmp_path / "run", steps, **{"train.micro_batch_size": 1})
    ref_args = run_overrides(tmp_path / "ref" / "run", steps, **{"train.micro_batch_size": 1})
    jobs.append(job_id := submit(tmp_path, args, nproc_per_node=2))
    refs.append(ref := TorchrunReference(tmp_path / "ref" / "run", 4, ref_args, steps))
    log = tmp_path / f"job-{job_id}.out"
    info = wait_for_end(job_id, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", _tail(log)
    assert f"2 node(s) x 2 proc(s), rendezvous {head_node_addr()}:{29500 + job_id % 1000}" in text, text
    assert "| 4 rank(s) on 2 node(s), cpu |" in text, text
    assert f"braid: done at iteration {steps}" in text, _tail(log)
    ref_metrics = ref.metrics()
    assert "| 4 rank(s) on 1 node(s), cpu |" in ref.log.read_text()
    assert_matches(metrics(tmp_path / "run"), ref_metrics)


@needs_cluster
@pytest.mark.timeout(PREEMPT_TIMEOUT_S + 120)
def test_time_limit_warning_checkpoints_requeues_and_finishes(tmp_path, cleanup):
    """2 nodes x 1 worker under a 2-minute limit, nothing sent by the test: Slurm's USR1 warning
    (`--signal=B:USR1@60`) reaches the batch shell, the ranks checkpoint and exit, the job requeues
    itself and resumes in the same run dir and wandb run until done; its metrics are those of an
    uninterrupted 2-process torchrun."""
    jobs, refs = cleanup
    run_dir = tmp_path / "run"
    args = run_overrides(run_dir, PREEMPT_STEPS, **{"logging.wandb": "offline"})
    jobs.append(job_id := submit(tmp_path, args, "--time=2", "--signal=B:USR1@60", nproc_per_node=1))
    refs.append(ref := TorchrunReference(tmp_path / "ref" / "run", 2,
                                         run_overrides(tmp_path / "ref" / "run", PREEMPT_STEPS), PREEMPT_STEPS))
    log = tmp_path / f"job-{job_id}.out"
    deadline = time.time() + JOB_TIMEOUT_S
    while not (run_dir / "wandb_id").is_file():
        assert job_info(job_id)["JobState"] not in TERMINAL, _tail(log)
        assert time.time() < deadline, "the job did not start training\n" + _tail(log)
        time.sleep(0.2)
    wandb_id = (run_dir / "wandb_id").read_text().strip()

    info = wait_for_end(job_id, log, PREEMPT_TIMEOUT_S)
    text = log.read_text()
    restarts = int(info["Restarts"])
    assert info["JobState"] == "COMPLETED" and info["TimeLimit"] == "00:02:00", _tail(log)
    assert restarts >= 1, (f"job {job_id} finished before Slurm's time-limit warning (30-60 s in): "
                           f"raise PREEMPT_STEPS\n" + _tail(log))
    assert "braid: USR1 (time limit near)" in text, _tail(log)
    # Rendezvous on the head node's NodeAddr: the names n1/n2 do not resolve on this machine.
    port = 29500 + job_id % 1000
    for attempt in range(restarts + 1):
        assert (f"braid: job {job_id} (restart {attempt}), 2 node(s) x 1 proc(s), "
                f"rendezvous {head_node_addr()}:{port}") in text, _tail(log)
    assert text.count("| 2 rank(s) on 2 node(s), cpu |") == restarts + 1, _tail(log)
    stops = [int(s) for s in re.findall(r"braid: stopping at iteration (\d+) on SIGUSR1", text)]
    assert stops and all(1 <= s < PREEMPT_STEPS for s in stops), _tail(log)
    for step in stops:  # every stop is picked up exactly where it left off
        assert f"resumed from {run_dir}/checkpoints/step_{step} at iteration {step}" in text, _tail(log)
    assert f"braid: done at iteration {PREEMPT_STEPS}" in text, _tail(log)
    # One run dir, one metrics file, one wandb run across every attempt; metrics as if never stopped.
    assert_matches(metrics(run_dir), ref.metrics())
    assert (run_dir / "wandb_id").read_text().strip() == wandb_id
    assert all(p.name.endswith(wandb_id) for p in (run_dir / "wandb").glob("offline-run-*"))
