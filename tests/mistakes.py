"""Harness for the table-driven tests of user mistakes (tests/test_mistakes_*.py).

A mistake costs one line, never a run: the command exits 2 (or the code a case names), prints one
``braid: ...`` line on stderr and no traceback, and every file of an existing run directory is
byte-identical afterwards. Commands run in a fresh interpreter, as a user types them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative name -> digest); symlinks by their target."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Mistake:
    """One mistaken command. ``argv`` is what follows the interpreter (``-m braid.train ...``) or, with
    ``shell=True``, a full shell command run from the repository root."""

    name: str
    argv: list[str]
    names: str  # a substring the error line must contain (the key, the file ...)
    code: int = 2
    shell: bool = False
    env: dict = field(default_factory=dict)


def run_mistake(m: Mistake, *, cwd: Path = ROOT, guard: Path | None = None, timeout: int = 240):
    """Run ``m``; assert the exit code, one error line naming ``m.names``, no traceback, and (with
    ``guard``) that the directory ``guard`` is byte-identical afterwards. Returns the stderr line."""
    before = tree_digest(guard) if guard is not None else None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", **m.env}
    env.pop("TRITON_INTERPRET", None)
    cmd = m.argv if m.shell else [sys.executable, *m.argv]
    r = subprocess.run(" ".join(cmd) if m.shell else cmd, shell=m.shell, cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == m.code, f"{m.name}: exit {r.returncode} (want {m.code})\n{out[-3000:]}"
    assert "Traceback" not in out, f"{m.name}: printed a traceback\n{out[-3000:]}"
    # torchrun's failure dump is a traceback by another name (launch/torchrun.sh must print braid's line instead).
    assert "ChildFailedError" not in out, f"{m.name}: printed torchrun's ChildFailedError\n{out[-3000:]}"
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("braid")]
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1, f"{m.name}: want one error line, got {errors}\n{out[-3000:]}"
    assert m.names in errors[0], f"{m.name}: '{m.names}' not in {errors[0]!r}"
    if guard is not None:
        assert tree_digest(guard) == before, f"{m.name}: {guard} changed"
    return errors[0]


def finished_run(parent: Path) -> Path:
    """A finished 2-step run of configs/tiny.yaml's tiny settings (config, metrics, a checkpoint) in
    ``parent/run``: what a mistaken command must not touch."""
    from braid.config import load_config
    from braid.trainer.trainer import Trainer
    from conftest import tiny_overrides

    path = parent / "run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(path, **{
        "train.steps": 2, "checkpoint.interval": 2, "train.eval_interval": 2}))
    Trainer(cfg).train()
    assert (path / "checkpoints" / "latest").exists()
    return path
