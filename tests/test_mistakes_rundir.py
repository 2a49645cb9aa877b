"""A mistaken command never costs a run: resuming with a key that cannot change, ``train.steps`` below the
checkpoint, training into an HF export, ``convert from-hf/to-hf --out`` onto an existing run or export
each exit 2 with one line naming the key or flag, and leave the directory byte-identical (issues 23.2, 23.6).
One tiny run (4 steps, checkpoints at 2 and 4) and its HF export per module; each case gets a copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from braid.config import load_config
from braid.convert.__main__ import main as convert_main
from braid.trainer.trainer import Trainer
from conftest import tiny_overrides
from mistakes import Mistake, run_mistake

TRAIN = ["-m", "braid.train", "--config", "configs/tiny.yaml"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("rundir")
    Trainer(load_config(None, tiny_overrides(base / "run", **{"train.steps": 4, "checkpoint.interval": 2}))).train()
    assert convert_main(["to-hf", "--checkpoint", str(base / "run" / "checkpoints" / "latest"),
                         "--out", str(base / "hf")]) == 0
    return base


def _resume(run: Path, **extra) -> list[str]:
    return TRAIN + tiny_overrides(run, **{"train.steps": 4, "checkpoint.interval": 2, **extra})


# (name, argv given the copied run dir and HF dir, what the line names, which of the two is guarded)
CASES = [
    ("resume with another model.preset", lambda r, h: _resume(r, **{"model.preset": "tiny-swa"}),
     "'model.preset' = 'tiny-swa' differs from checkpoint", "run"),
    ("resume with another model size", lambda r, h: _resume(r, **{"model.d_model": 96}),
     "'model.d_model' = 96 differs", "run"),
    ("resume with another data.seq_len", lambda r, h: _resume(r, **{"data.seq_len": 64}),
     "'data.seq_len' = 64 differs from checkpoint", "run"),
    ("resume with another seed", lambda r, h: _resume(r, **{"train.seed": 7}), "'train.seed' = 7", "run"),
    ("train.steps below the checkpoint", lambda r, h: _resume(r, **{"train.steps": 3}),
     "'train.steps' = 3 is below iteration 4", "run"),
    ("train into an HF export", lambda r, h: _resume(h), "'run.dir'", "hf"),
    ("from-hf onto a run", lambda r, h: ["-m", "braid.convert", "from-hf", "--hf", str(h), "--out", str(r)],
     "holds a braid run (checkpoints/); pass --overwrite", "run"),
    ("to-hf onto an export", lambda r, h: ["-m", "braid.convert", "to-hf", "--checkpoint",
                                            str(r / "checkpoints" / "latest"), "--out", str(h)],
     "holds a Hugging Face export (config.json); pass --overwrite", "hf"),
    ("from-hf onto its source, even with --overwrite", lambda r, h: ["-m", "braid.convert", "from-hf", "--hf",
                                                                     str(h), "--out", str(h), "--overwrite"],
     "contains the --hf directory", "hf"),
    ("to-hf into its own run dir", lambda r, h: ["-m", "braid.convert", "to-hf", "--checkpoint",
                                                  str(r / "checkpoints" / "latest"), "--out", str(r)],
     "contains the checkpoint", "run"),
]


@pytest.mark.parametrize("name,argv,names,guard", CASES, ids=[c[0] for c in CASES])
def test_mistake_leaves_the_run(made, tmp_path, name, argv, names, guard):
    run, hf = tmp_path / "run", tmp_path / "hf"
    shutil.copytree(made / "run", run)
    shutil.copytree(made / "hf", hf)
    run_mistake(Mistake(name, argv(run, hf), names), guard=run if guard == "run" else hf)


def test_checkpoint_config_wins_over_a_clobbered_run_config(made, tmp_path):
    """Run dirs damaged by older braid versions (config.yaml overwritten by a refused command) still convert."""
    from braid.convert import load

    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("d_model: 64", "d_model: 96"))
    assert load(run / "checkpoints" / "latest").model.embed.weight.shape[1] == 64


def test_overwrite_replaces_the_out_dir(made, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(made / "hf", hf)
    (hf / "stale.txt").write_text("x")
    latest = str(made / "run" / "checkpoints" / "latest")
    assert convert_main(["to-hf", "--checkpoint", latest, "--out", str(hf), "--overwrite"]) == 0
    assert (hf / "config.json").is_file() and not (hf / "stale.txt").exists()


def test_from_hf_overwrite_replaces_the_run(made, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    assert convert_main(["from-hf", "--hf", str(made / "hf"), "--out", str(run), "--overwrite"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0"]
    assert {"config.yaml", "braid.json"} <= {p.name for p in (run / "checkpoints" / "step_0").iterdir()}
