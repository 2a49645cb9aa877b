"""Launch scripts: dry-run their command lines under a fake Slurm environment (no Slurm needed),
drive the USR1 -> checkpoint -> requeue path once with a real torchrun and stand-ins for
srun, scontrol and braid.train, and check that braid.torchrun turns a rank's braid error into one
line and braid's exit code (stand-in workers: no training)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm.sbatch"
TORCHRUN = ROOT / "launch" / "torchrun.sh"
BASH = shutil.which("bash") or "/bin/bash"
# What the scripts run when PYTHON is unset: the repository's venv when `make` made one.
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
DEFAULT_PYTHON = str(VENV_PYTHON) if os.access(VENV_PYTHON, os.X_OK) else "python"

USER_ARGS = ["--config", "configs/x.yaml", "train.lr=3e-4", "data.path=/d/a b"]
SLURM_ENV = {
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_NNODES": "2",
    "SLURM_JOB_ID": "1234",
    "SLURM_GPUS_ON_NODE": "4",
}


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """An otherwise empty PATH, so no real scontrol / nvidia-smi / srun on this host leaks in."""
    d = tmp_path / "bin"
    d.mkdir()
    return d


def run_script(script: Path, args: list[str], env: dict[str, str], path: Path, dry: bool = True, cwd=None):
    full_env = {"PATH": str(path), **env}
    if dry:
        full_env["BRAID_DRY_RUN"] = "1"
    return subprocess.run([BASH, str(script), *args], env=full_env, capture_output=True,
                          text=True, timeout=10, cwd=cwd)


def srun_argv(out: str) -> list[str]:
    lines = [ln for ln in out.splitlines() if ln.startswith("srun ")]
    assert len(lines) == 1, out
    return shlex.split(lines[0])


def opt(argv: list[str], name: str) -> str:
    """Value of a --name=value argument; it must appear exactly once."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def train_args(argv: list[str]) -> list[str]:
    i = argv.index("-m", argv.index("braid.torchrun"))
    assert argv[i + 1] == "braid.train"
    return argv[i + 2:]


def sbatch_dry(bin_dir: Path, args=USER_ARGS, **env) -> list[str]:
    res = run_script(SBATCH, list(args), {**SLURM_ENV, **env}, bin_dir)
    assert res.returncode == 0, res.stderr
    return srun_argv(res.stdout)


# ----------------------------------------------------------------------------------- syntax


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN], ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script: Path):
    assert subprocess.run([BASH, "-n", str(script)], capture_output=True).returncode == 0
    assert os.access(script, os.X_OK)


def test_sbatch_headers():
    text = SBATCH.read_text()
    for header in ("--ntasks-per-node=1", "--signal=B:USR1@120", "--requeue"):
        assert f"#SBATCH {header}\n" in text
    assert any(ln.startswith("#SBATCH --output=") and ln.endswith("%j.out")
               for ln in text.splitlines())


# ------------------------------------------------------------------------------ slurm.sbatch


def test_sbatch_dry_run_command(bin_dir: Path):
    res = run_script(SBATCH, USER_ARGS, SLURM_ENV, bin_dir)
    assert res.returncode == 0, res.stderr
    argv = srun_argv(res.stdout)
    assert argv[:2] == ["srun", "--kill-on-bad-exit=1"]
    py = argv.index(DEFAULT_PYTHON)
    assert argv[py + 1:py + 3] == ["-m", "braid.torchrun"]
    assert opt(argv, "--nnodes") == "2"
    assert opt(argv, "--nproc_per_node") == "4"
    assert opt(argv, "--rdzv_backend") == "c10d"
    assert opt(argv, "--rdzv_endpoint") == "n1:29734"  # 29500 + 1234 % 1000
    assert opt(argv, "--rdzv_id") == "1234"
    # The user's arguments pass through unchanged and in order; the defaults follow them.
    assert train_args(argv) == USER_ARGS + ["checkpoint.resume=auto", "run.name=slurm-1234"]
    # The layout is checked once, on the batch host, for all nodes × workers, before srun.
    check = shlex.split(res.stdout.splitlines()[0])
    assert check == [DEFAULT_PYTHON, "-m", "braid.train", "--check-world-size", "8", *train_args(argv)]
    # The requeue step is announced, not run.
    on_usr1 = [ln for ln in res.stdout.splitlines() if ln.startswith("# on USR1:")]
    assert any("scontrol requeue 1234" in ln for ln in on_usr1), res.stdout


def test_sbatch_user_values_win(bin_dir: Path):
    args = USER_ARGS + ["run.name=mine", "checkpoint.resume=none"]
    argv = train_args(sbatch_dry(bin_dir, args))
    assert [a for a in argv if a.startswith("run.name=")][-1] == "run.name=mine"
    assert [a for a in argv if a.startswith("checkpoint.resume=")][-1] == "checkpoint.resume=none"
    assert "run.name=slurm-1234" not in argv and "checkpoint.resume=auto" not in argv


@pytest.mark.parametrize("spec, expected", [("h100:8", "8"), ("4", "4"), ("gpu:a100:2", "2")])
def test_sbatch_nproc_from_gpus_per_node(bin_dir: Path, spec: str, expected: str):
    argv = sbatch_dry(bin_dir, SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE=spec)
    assert opt(argv, "--nproc_per_node") == expected


def test_sbatch_nproc_env_wins(bin_dir: Path):
    argv = sbatch_dry(bin_dir, NPROC_PER_NODE="3", SLURM_GPUS_PER_NODE="h100:8")
    assert opt(argv, "--nproc_per_node") == "3"


def test_sbatch_nproc_falls_back_to_one(bin_dir: Path):
    argv = sbatch_dry(bin_dir, SLURM_GPUS_ON_NODE="")
    assert opt(argv, "--nproc_per_node") == "1"


def test_sbatch_nproc_from_nvidia_smi(bin_dir: Path):
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf 'GPU 0: H100 (UUID: a)\\nGPU 1: H100 (UUID: b)\\n'\n")
    smi.chmod(0o755)
    argv = sbatch_dry(bin_dir, SLURM_GPUS_ON_NODE="")
    assert opt(argv, "--nproc_per_node") == "2"


@pytest.mark.parametrize("nodelist, head", [
    ("n1", "n1"),
    ("gpu[01-04,07]", "gpu01"),
    ("a1,b2", "a1"),
    ("rack[2-3]-n[5,9],x1", "rack2-n5"),
])
def test_sbatch_head_node_without_scontrol(bin_dir: Path, nodelist: str, head: str):
    argv = sbatch_dry(bin_dir, SLURM_JOB_NODELIST=nodelist)
    assert opt(argv, "--rdzv_endpoint") == f"{head}:29734"


def test_sbatch_head_node_addr_from_scontrol(bin_dir: Path, tmp_path: Path):
    log = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "$*" >> {shlex.quote(str(log))}
        case "$1 $2" in
          "show hostnames") printf 'gpu01\\ngpu02\\n' ;;
          "show node") printf 'NodeName=%s Arch=x86_64\\n   NodeAddr=10.1.2.3 NodeHostName=%s\\n' "$3" "$3" ;;
          *) exit 1 ;;
        esac
        """))
    scontrol.chmod(0o755)
    argv = sbatch_dry(bin_dir, SLURM_JOB_NODELIST="gpu[01-02]")
    assert opt(argv, "--rdzv_endpoint") == "10.1.2.3:29734"
    assert log.read_text().splitlines() == ["show hostnames gpu[01-02]", "show node gpu01"]


def test_sbatch_rdzv_overrides(bin_dir: Path):
    argv = sbatch_dry(bin_dir, BRAID_RDZV_HOST="head.example", BRAID_RDZV_PORT="31000")
    assert opt(argv, "--rdzv_endpoint") == "head.example:31000"


def test_sbatch_needs_slurm_outside_dry_run(bin_dir: Path):
    res = run_script(SBATCH, USER_ARGS, {}, bin_dir, dry=False)
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "SLURM_JOB_ID" in res.stderr


def test_sbatch_needs_config(bin_dir: Path):
    res = run_script(SBATCH, ["train.lr=1"], SLURM_ENV, bin_dir)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--config" in res.stderr


# ------------------------------------------------------------------------------ torchrun.sh


def torchrun_dry_both(bin_dir: Path, args: list[str], script: Path = TORCHRUN, **env):
    """The two commands a dry run prints: the layout check, then the launch."""
    res = run_script(script, args, env, bin_dir)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2, res.stdout
    return shlex.split(lines[0]), shlex.split(lines[1])


def torchrun_dry(bin_dir: Path, args: list[str], **env) -> list[str]:
    return torchrun_dry_both(bin_dir, args, **env)[1]


def test_torchrun_dry_run(bin_dir: Path):
    check, argv = torchrun_dry_both(bin_dir, ["--nproc", "3", *USER_ARGS])
    assert argv[:3] == [DEFAULT_PYTHON, "-m", "braid.torchrun"]
    assert "--standalone" in argv
    assert opt(argv, "--nnodes") == "1"
    assert opt(argv, "--nproc_per_node") == "3"
    assert train_args(argv) == USER_ARGS
    assert check == [DEFAULT_PYTHON, "-m", "braid.train", "--check-world-size", "3", *USER_ARGS]


def test_torchrun_checks_the_whole_world(bin_dir: Path):
    check, _ = torchrun_dry_both(bin_dir, ["--nnodes", "2", "--rdzv-endpoint", "h:1", "--nproc", "4", *USER_ARGS])
    assert check[3:5] == ["--check-world-size", "8"]


def test_torchrun_nproc_defaults(bin_dir: Path):
    assert opt(torchrun_dry(bin_dir, USER_ARGS), "--nproc_per_node") == "1"
    assert opt(torchrun_dry(bin_dir, USER_ARGS, NPROC_PER_NODE="5"), "--nproc_per_node") == "5"
    check, argv = torchrun_dry_both(bin_dir, USER_ARGS, PYTHON="/opt/venv/bin/python")
    assert argv[0] == check[0] == "/opt/venv/bin/python"


def _fake_repo(root: Path, with_venv: bool) -> Path:
    """A copy of launch/ in a directory with (or without) an executable .venv/bin/python."""
    shutil.copytree(ROOT / "launch", root / "launch", ignore=shutil.ignore_patterns("slurm_cluster"))
    if with_venv:
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
        (root / ".venv" / "bin" / "python").chmod(0o755)
    return root


@pytest.mark.parametrize("with_venv", [True, False], ids=["venv", "no-venv"])
def test_scripts_default_to_the_repos_venv(tmp_path: Path, bin_dir: Path, with_venv: bool):
    """A fresh shell after `make train` has no activated venv: the scripts find .venv themselves."""
    repo = _fake_repo(tmp_path / "repo", with_venv)
    want = str(repo / ".venv" / "bin" / "python") if with_venv else "python"
    check, argv = torchrun_dry_both(bin_dir, USER_ARGS, script=repo / "launch" / "torchrun.sh")
    assert argv[0] == check[0] == want
    res = run_script(repo / "launch" / "slurm.sbatch", USER_ARGS, SLURM_ENV, bin_dir, cwd=repo)
    assert res.returncode == 0, res.stderr
    argv = srun_argv(res.stdout)
    assert argv[argv.index("-m") - 1] == want


def test_sbatch_copy_finds_the_venv_of_the_job_dir(tmp_path: Path, bin_dir: Path):
    """sbatch runs a copy of the script from its spool directory, in the submit (working) directory."""
    repo = _fake_repo(tmp_path / "repo", with_venv=True)
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(SBATCH, spool / "slurm_script")
    res = run_script(spool / "slurm_script", USER_ARGS, SLURM_ENV, bin_dir, cwd=repo)
    assert res.returncode == 0, res.stderr
    argv = srun_argv(res.stdout)
    assert argv[argv.index("-m") - 1] == str(repo / ".venv" / "bin" / "python")


@pytest.mark.parametrize("args", [["train.lr=1"], ["--nproc", "0", "--config", "c.yaml"]])
def test_torchrun_usage_errors(bin_dir: Path, args: list[str]):
    res = run_script(TORCHRUN, args, {}, bin_dir)
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------- USR1 -> checkpoint -> requeue, live

FAKE_TRAIN = """\
import os, signal, sys, time
out = os.environ["FAKE_OUT"]
if "--check-world-size" in sys.argv:  # the launcher's layout check, on the batch host
    open(os.path.join(out, "checked"), "w").write(" ".join(sys.argv[1:]))
    sys.exit(0)
stop = False
def on_signal(sig, frame):
    global stop
    stop = True
signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
rank = os.environ["RANK"]
open(os.path.join(out, "started." + rank), "w").write(" ".join(sys.argv[1:]))
deadline = time.time() + 20
while not stop and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # a checkpoint that takes a while: torchrun must not kill us meanwhile
open(os.path.join(out, "checkpointed." + rank), "w").write("signal" if stop else "timeout")
"""


def test_sbatch_usr1_checkpoints_then_requeues(tmp_path: Path, bin_dir: Path):
    """The real script with stand-ins for srun (runs the task in place), scontrol (records its
    calls) and braid.train (checkpoints on USR1), under a real torchrun on the CPU."""
    pytest.importorskip("torch.distributed.run")
    out = tmp_path / "out"
    out.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {shlex.quote(str(out / "scontrol"))}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    work = tmp_path / "work"  # the cwd comes first on sys.path, so this braid shadows the real one
    (work / "braid").mkdir(parents=True)
    (work / "braid" / "__init__.py").write_text("")
    (work / "braid" / "train.py").write_text(FAKE_TRAIN)
    shutil.copy(ROOT / "braid" / "torchrun.py", work / "braid" / "torchrun.py")  # the real launcher

    env = {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHON": sys.executable, "FAKE_OUT": str(out), "NPROC_PER_NODE": "2",
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost",
        "BRAID_RDZV_HOST": "127.0.0.1",
    }
    # A free port rather than the job-id default, so parallel test runs cannot collide.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["BRAID_RDZV_PORT"] = str(s.getsockname()[1])

    # Own session, so a failing test can take down torchrun and its workers with the shell.
    proc = subprocess.Popen([BASH, str(SBATCH), "--config", "c.yaml", "x.y=1"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 30
        while not all((out / f"started.{r}").exists() for r in (0, 1)):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log
    for r in (0, 1):
        assert (out / f"checkpointed.{r}").read_text() == "signal", log
    started = (out / "started.0").read_text().split()
    assert started == ["--config", "c.yaml", "x.y=1", "checkpoint.resume=auto", "run.name=slurm-4242"]
    assert (out / "checked").read_text().split() == ["--check-world-size", "2", *started]
    assert (out / "scontrol").read_text().splitlines() == ["requeue 4242"]


# ------------------------------------------------- braid.torchrun: a rank's braid error, once

FAKE_RANK = """\
import os, sys, time
from braid.train import _fail
rank, mode = int(os.environ["RANK"]), os.environ["FAKE_MODE"]
if mode == "every rank":
    _fail("data.source '/d/x' does not exist")
if mode == "rank 1 only":
    if rank == 1:
        _fail("train.max_nan_iterations = 3 non-finite steps in a row", 3)
    time.sleep(60)  # torchrun must stop this rank once rank 1 has failed
if mode == "crash":  # one rank, so torchrun's first observed failure is that traceback, not a rank it stopped
    if rank == 0:
        raise RuntimeError("a bug, not bad input")
    time.sleep(60)
"""


@pytest.mark.parametrize("mode, code, line", [
    ("every rank", 2, "braid: error: data.source '/d/x' does not exist"),
    ("rank 1 only", 3, "braid: error: train.max_nan_iterations = 3 non-finite steps in a row"),
    ("crash", 1, None),
])
def test_braid_torchrun_reports_a_ranks_error_once(tmp_path: Path, mode: str, code: int, line):
    pytest.importorskip("torch.distributed.run")
    worker = tmp_path / "rank.py"
    worker.write_text(FAKE_RANK)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_MODE": mode, "TMPDIR": str(scratch)}
    res = subprocess.run([sys.executable, "-m", "braid.torchrun", "--standalone", "--nnodes=1",
                          "--nproc_per_node=2", str(worker)], env=env, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    if line is None:  # not braid's: torchrun's own report, untouched
        assert "ChildFailedError" in out and "RuntimeError: a bug, not bad input" in out
        assert not [ln for ln in res.stderr.splitlines() if ln.startswith("braid")], out
    else:
        assert [ln for ln in res.stderr.splitlines() if ln.startswith("braid")] == [line], out
        assert "Traceback" not in out and "ChildFailedError" not in out and "exitcode" not in out, out
    assert not list(scratch.glob("braid-errors-*")), "the launcher left its error folder behind"


def test_the_layout_check_is_fast_and_writes_nothing(tmp_path: Path):
    """`braid.train --check-world-size` runs before every launch: config arithmetic only, no torch."""
    code = ("import sys; from braid.train import main; "
            f"main(['--config', {str(ROOT / 'configs' / 'tiny.yaml')!r}, '--check-world-size', '2', "
            "'train.global_batch_size=16', 'run.dir=run']); "
            "assert 'torch' not in sys.modules, 'the check imported torch'")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == res.stderr == ""
    assert not list(tmp_path.iterdir())
