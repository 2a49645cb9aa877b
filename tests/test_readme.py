"""Every shell block of README.md runs as written, so the README cannot drift from the code.

Each block runs in a fresh directory that looks like a clone after ``make train`` (configs/, launch/,
Makefile, pyproject.toml and the installed .venv, linked), with the venv first on PATH as the quick
start's ``source .venv/bin/activate`` leaves it. What a README command cannot do here as written (a
10-minute training, 8 GPUs, a host called node0, a stock HF checkpoint from the internet) is replaced
by the explicit table RULES below: tiny step counts, fewer processes with the global batch scaled
along, a free local port, a run trained on the spot. Slurm blocks run on the local cluster of
launch/slurm_cluster when it is up, else as ``BRAID_DRY_RUN=1`` with their check run for real.

A shell line no rule knows fails ``test_every_readme_block_has_a_rule`` (cheap, default run) with
"unknown README block"; the blocks themselves run in ``test_readme_block`` (slow, one test each).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import ROOT

README = ROOT / "README.md"
SHELL_FENCES = {"bash", "sh", "shell", "console", "zsh"}
LM_EVAL_TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"
STEPS = 2  # every training a README block starts


@dataclass
class Block:
    section: str  # the "## " heading above it
    line: int  # README line of its first command
    commands: list[str]

    @property
    def id(self) -> str:
        return f"{self.section}:{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The shell blocks of the README, each a list of command lines (comment lines dropped)."""
    blocks, section, fence, start, lines = [], "", None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                fence, start, lines = line[3:].strip().lower(), n + 1, []
        elif line.startswith("```"):
            if fence in SHELL_FENCES:
                commands = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
                blocks.append(Block(section, start, commands))
            fence = None
        else:
            lines.append(line)
    return blocks


# ------------------------------------------------------------------------------ the table


@dataclass
class Run:
    """One block's directory and what its commands left for the next ones (an export dir, ...)."""

    cwd: Path
    env: dict
    state: dict = field(default_factory=dict)

    def run(self, argv: list[str], env: Optional[dict] = None, base: Optional[dict] = None,
            timeout: int = 280) -> subprocess.CompletedProcess:
        """Run ``argv`` in the block's directory, in ``base`` (default: the block's shell) plus ``env``."""
        res = subprocess.run(argv, cwd=self.cwd, env={**(self.env if base is None else base), **(env or {})},
                             capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{shlex.join(argv)} exited {res.returncode}\n{(res.stdout + res.stderr)[-4000:]}"
        return res


@dataclass
class Rule:
    """README lines matching ``pattern`` become ``rewrite(argv, run)`` (argv: the line split, env
    prefix apart; ``edit(line, run)`` first replaces placeholders of several words); ``after(run, argv,
    result)`` checks what the line promised. Lines of a rule with ``together`` are meant for different
    machines: consecutive ones run at the same time."""

    name: str
    pattern: str
    rewrite: Callable[[list[str], Run], list[str]]
    after: Optional[Callable] = None
    together: bool = False
    env: Optional[Callable[[list[str], Run], dict]] = None
    edit: Optional[Callable[[str, Run], str]] = None
    activated: bool = True  # False: the README says the command finds .venv by itself


def _opt(argv: list[str], name: str) -> Optional[str]:
    """The value of ``name V`` or ``name=V`` in argv (last one wins), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _set(argv: list[str], name: str, value: str) -> list[str]:
    """Replace the value of ``name V`` / ``name=V`` (the form the README used), or append ``name=V``."""
    out, found = list(argv), False
    for i, a in enumerate(out):
        if a == name and i + 1 < len(out):
            out[i + 1], found = value, True
        elif a.startswith(name + "="):
            out[i], found = f"{name}={value}", True
    return out if found else out + [f"{name}={value}"]


def _tiny_steps(argv: list[str]) -> list[str]:
    return _set(argv, "train.steps", str(STEPS))


def _scale_batch(argv: list[str], world_before: int, world_after: int) -> list[str]:
    """Fewer ranks than the README's: its global batch shrinks alike, so micro × ranks still divides it."""
    gbs = _opt(argv, "train.global_batch_size")
    if gbs is None:
        return argv
    assert int(gbs) * world_after % world_before == 0, (gbs, world_before, world_after)
    return _set(argv, "train.global_batch_size", str(int(gbs) * world_after // world_before))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_train(argv, run):
    # The venv the tests run in is installed already: -o keeps make from reinstalling it (and from
    # re-pointing a shared venv's editable install at this temporary directory).
    assert argv == ["make", "train"], argv
    return ["make", "-o", ".venv/.installed", "train", f"ARGS=train.steps={STEPS}"]


def _make_train_after(run, argv, res):
    assert (run.cwd / "runs" / "tiny" / "checkpoints" / "latest").exists(), "make train left no runs/tiny/"


def _make_test_after(run, argv, res):
    assert "pytest" in res.stdout, res.stdout


def _make_test(argv, run):
    assert argv == ["make", "test"], argv
    return ["make", "-n", "-o", ".venv/.installed", "test"]  # the suite cannot run inside itself: dry run


def _braid_train(argv, run):
    return _tiny_steps(argv)


def _torchrun_one_node(argv, run):
    nproc = int(_opt(argv, "--nproc"))
    return _tiny_steps(_scale_batch(_set(argv, "--nproc", "2"), nproc, 2))


def _torchrun_nodes(argv, run):
    """Two launchers here for the README's two nodes: node0 is this host, on a free port."""
    nodes, nproc = int(_opt(argv, "--nnodes")), int(_opt(argv, "--nproc"))
    port = run.state.setdefault("port", _free_port())
    out = _set(_set(argv, "--nproc", "1"), "--rdzv-endpoint", f"127.0.0.1:{port}")
    return _tiny_steps(_scale_batch(out, nodes * nproc, nodes))


def _slurm_problem() -> Optional[str]:
    from test_slurm_cluster import _problem

    return _problem


def _sbatch(argv, run):
    """On the local cluster: the job, waited for, on its CPU nodes (no GPUs, at most 2 nodes, one worker
    each unless the line says). Elsewhere: the script itself under BRAID_DRY_RUN=1, fed the allocation."""
    i = argv.index("sbatch")
    flags, script = [], None
    for j in range(i + 1, len(argv)):
        if argv[j].endswith("slurm.sbatch"):
            script = j
            break
        flags.append(argv[j])
    assert script is not None, f"no launch/slurm.sbatch in {argv}"
    nodes = int(_opt(flags, "-N") or 1)
    gpus = _opt(flags, "--gpus-per-node")
    nproc = run.state["line_env"].get("NPROC_PER_NODE")
    run.state["slurm_world"] = nodes * int(gpus or nproc or 1)
    if _slurm_problem() is not None:
        run.state["sbatch_env"] = {"BRAID_DRY_RUN": "1", "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": "1",
                                   "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_PER_NODE": gpus or ""}
        return argv[script:]
    kept, skip = [], False
    for f in flags:  # the node count and GPUs are the test cluster's
        if not skip and f not in ("-N", "--nodes") and not f.startswith(("--gpus-per-node", "--nodes=")):
            kept.append(f)
        skip = f in ("-N", "--nodes")
    run.state["sbatch_env"] = {"NPROC_PER_NODE": nproc or "1"}
    world = min(nodes, 2) * int(nproc or 1)
    return ["sbatch", "--wait", "-N", str(min(nodes, 2)), *kept, argv[script],
            *_tiny_steps(_scale_batch(argv[script + 1:], run.state["slurm_world"], world))]


def _sbatch_env(argv, run):
    return run.state.pop("sbatch_env")


def _sbatch_after(run, argv, res):
    if argv[0] == "sbatch":
        return  # the job ran and exited 0 (sbatch --wait passes its status on)
    # The dry run prints the layout check first: run it, so the README's config fits the job's world.
    check = shlex.split(res.stdout.splitlines()[0])
    assert check[check.index("--check-world-size") + 1] == str(run.state["slurm_world"]), res.stdout
    run.run(check)
    assert any(ln.startswith("srun ") for ln in res.stdout.splitlines()), res.stdout


def _preprocess(argv, run):
    """The README's input (data.jsonl) is made here: enough documents for megatron-core's held-out split."""
    docs = [{"text": f"def f{i}(x):\n    return x * {i} + {i % 7}  # document {i}\n" * 4} for i in range(200)]
    (run.cwd / _opt(argv, "--input")).write_text("".join(json.dumps(d) + "\n" for d in docs))
    return _set(_set(argv, "--workers", "2"), "--output-prefix", _local(_opt(argv, "--output-prefix"), run))


def _local(path: str, run: Run) -> str:
    """An absolute README path (/d/corpus) inside this block's directory."""
    return str(run.cwd / path.lstrip("/")) if path.startswith("/") else path


def _preprocess_after(run, argv, res):
    """Train on the dataset by the name the README's Preprocess section gives (`data.source=...`)."""
    section = README.read_text().split("## Preprocess", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"`data\.source=([^`\s]+)`", section)
    assert names, "the Preprocess section names no `data.source=...` to train on"
    source = Path(_local(names[0], run))
    written = sorted(str(p.relative_to(run.cwd)) for p in source.parent.glob("*") if p.is_file())
    assert source.with_name(source.name + ".bin").is_file(), (
        f"the README's Preprocess section says to train on data.source={names[0]}, "
        f"but its command wrote {written}")
    run.run(["python", "-m", "braid.train", "--config", "configs/tiny.yaml", f"data.source={source}",
             f"train.steps={STEPS}", "train.eval_iters=1"])


def _to_hf(argv, run):
    """The README's run (runs/x) is trained here first: dense GQA, so its export is a stock Llama."""
    checkpoint = _opt(argv, "--checkpoint")
    run_dir = checkpoint.split("/checkpoints")[0]
    run.run(["python", "-m", "braid.train", "--config", "configs/tiny.yaml", "model.preset=tiny",
             "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.pattern=AA", "data.seq_len=32",
             "train.micro_batch_size=2", "train.global_batch_size=4", f"train.steps={STEPS}", "train.eval_iters=1",
             f"run.dir={run_dir}"])
    run.state["hf"] = _opt(argv, "--out")
    return argv


def _stock_hf(line, run):
    """``<stock HF dir>``: the to-hf export above, which is a stock transformers checkpoint."""
    hf = run.state["hf"]
    config = json.loads((run.cwd / hf / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["LlamaForCausalLM"], config
    return line.replace("<stock HF dir>", hf)


def _from_hf(argv, run):
    return argv


def _generate(argv, run):
    return _set(argv, "--max-new-tokens", "8")


def _eval_line(line: str, run: Run) -> str:
    """``<tasks>`` and the optional ``[--include-path <dir>]``: the offline tasks of tests/data."""
    return line.replace("[--include-path <dir>]", f"--include-path {LM_EVAL_TASKS}").replace("<tasks>", "braid_tiny_mc")


def _eval(argv, run):
    return [*argv, "--ppl-samples", "2", "--limit", "2"]


def _rehearse(argv, run):
    """The real preset on 64 ranks takes minutes on fake tensors: its tiny flavour on 8, same command shape."""
    argv = [a.replace("model.preset=kimi-linear", "model.preset=kimi-linear-tiny") for a in argv]
    argv = [a for a in argv if not a.startswith(("data.seq_len=", "train.global_batch_size=", "parallel.ep="))]
    return [*_set(argv, "--world-size", "8"), "parallel.ep=8", "train.global_batch_size=8", "data.seq_len=256"]


def _rehearse_after(run, argv, res):
    data = json.loads(res.stdout)
    assert data["fits"] is True and data["world_size"] == 8 and data["layout"]["ep"] == 8, data


RULES = [
    Rule("make train", r"^make train\b", _make_train, after=_make_train_after),
    Rule("make test", r"^make test\b", _make_test, after=_make_test_after),
    Rule("braid.train", r"^python -m braid\.train ", _braid_train),
    Rule("torchrun.sh, several nodes", r"^launch/torchrun\.sh .*--nnodes ", _torchrun_nodes, together=True,
         activated=False),
    Rule("torchrun.sh, one node", r"^launch/torchrun\.sh ", _torchrun_one_node, activated=False),
    Rule("sbatch", r"^([A-Z_]+=\S+ )*sbatch ", _sbatch, after=_sbatch_after, env=_sbatch_env, activated=False),
    Rule("braid.preprocess", r"^python -m braid\.preprocess ", _preprocess, after=_preprocess_after),
    Rule("braid.convert to-hf", r"^python -m braid\.convert to-hf ", _to_hf),
    Rule("braid.convert from-hf", r"^python -m braid\.convert from-hf ", _from_hf, edit=_stock_hf),
    Rule("braid.generate", r"^python -m braid\.generate ", _generate),
    Rule("braid.eval", r"^python -m braid\.eval ", _eval, edit=_eval_line),
    Rule("braid.rehearse", r"^python -m braid\.rehearse ", _rehearse, after=_rehearse_after),
]


def rule_for(line: str) -> Rule:
    for rule in RULES:
        if re.search(rule.pattern, line):
            return rule
    raise LookupError(line)


BLOCKS = readme_blocks(README.read_text())


def unknown_lines(blocks: list[Block]) -> tuple[list[str], set[str]]:
    """README lines no rule knows (where they are, what they say) and the names of the rules used."""
    unknown, used = [], set()
    for block in blocks:
        for line in block.commands:
            try:
                used.add(rule_for(line).name)
            except LookupError:
                unknown.append(f"{block.section}, README.md line ~{block.line}: {line}")
    return unknown, used


def test_every_readme_block_has_a_rule():
    unknown, used = unknown_lines(BLOCKS)
    assert not unknown, "unknown README block (give it a rule in tests/test_readme.py): " + "; ".join(unknown)
    stale = [r.name for r in RULES if r.name not in used]
    assert not stale, f"rules for commands the README no longer has: {stale}"


def test_the_parser_sees_blocks_and_skips_other_fences():
    text = ("## A\n```bash\n# a comment\nmake train  # why\n```\n```\nruns/\n```\n"
            "## B\n```sh\nlaunch/torchrun.sh --nproc 8\npip install braid\n```\n")
    blocks = readme_blocks(text)
    assert [(b.section, b.commands) for b in blocks] == [
        ("A", ["make train  # why"]), ("B", ["launch/torchrun.sh --nproc 8", "pip install braid"])]
    unknown, used = unknown_lines(blocks)
    assert unknown == ["B, README.md line ~11: pip install braid"] and used == {"make train", "torchrun.sh, one node"}


# -------------------------------------------------------------------------------- running


def _clone_like(path: Path) -> Path:
    """A directory that looks like the repository after `make train`, for one block."""
    path.mkdir()
    for name in ("configs", "launch", "Makefile", "pyproject.toml"):
        (path / name).symlink_to(ROOT / name)
    venv = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "python").exists() else Path(sys.prefix)
    (path / ".venv").symlink_to(venv)
    return path


def _fresh_shell_env() -> dict:
    """A shell that has activated no venv (the pytest's own venv off PATH), with this checkout's braid
    and no Slurm allocation of the pytest itself."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("TRITON_INTERPRET", "VIRTUAL_ENV", "PYTHON")}
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d).parent / "pyvenv.cfg").exists()]
    env.update(PATH=os.pathsep.join(path), PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    return env


def _activated(env: dict, cwd: Path) -> dict:
    """What the quick start's ``source .venv/bin/activate`` leaves, when the README says to run it."""
    if "source .venv/bin/activate" not in README.read_text().split("\n## ", 2)[1]:
        return env
    return {**env, "PATH": f"{cwd / '.venv' / 'bin'}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(cwd / ".venv")}


def _split(line: str, run: Run) -> tuple[dict, list[str]]:
    """The line's leading NAME=value words (as the environment) and its argv."""
    words = shlex.split(line, comments=True)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = os.path.expandvars(value.replace("$PWD", str(run.cwd)))
    return env, words


@pytest.mark.slow  # each block trains for a few steps (one with 2 ranks, one on 2 "nodes"); one ~10-90 s
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(tmp_path: Path, block: Block):
    if any(rule_for(line).name.startswith("make") for line in block.commands) and shutil.which("make") is None:
        pytest.skip("make is not installed")
    cwd = _clone_like(tmp_path / "clone")
    fresh = _fresh_shell_env()
    run = Run(cwd, _activated(fresh, cwd))
    pending = []  # lines of a `together` rule: started at once, then waited for

    def finish():
        procs = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for argv, env in pending]
        try:
            outs = [p.communicate(timeout=280)[0] for p in procs]
        finally:  # one launcher failing leaves the other waiting at the rendezvous
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for (argv, _), p, out in zip(pending, procs, outs):
            assert p.returncode == 0, f"{shlex.join(argv)} exited {p.returncode}\n{out[-4000:]}"
        pending.clear()

    for line in block.commands:
        rule = rule_for(line)
        env, argv = _split(rule.edit(line, run) if rule.edit else line, run)
        run.state["line_env"] = env
        argv = rule.rewrite(argv, run)
        env.update(rule.env(argv, run) if rule.env else {})
        base = run.env if rule.activated else fresh
        if rule.together:
            pending.append((argv, {**base, **env}))
            continue
        if pending:
            finish()
        res = run.run(argv, env, base)
        if rule.after:
            rule.after(run, argv, res)
    if pending:
        finish()
