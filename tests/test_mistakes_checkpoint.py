"""A tampered checkpoint or a pickled HF directory costs one line, runs nothing and changes nothing.

Each command runs in a fresh interpreter, as typed. ``{meta}`` is a genuine run whose newest
checkpoint's DCP metadata carries a payload, ``{rng}`` one whose RNG file does, ``{only}`` a run
whose one checkpoint's metadata does (manifests updated to match, see checkpoint_plants.py),
``{bin}`` a HF directory holding ``pytorch_model.bin`` and ``{evil_bin}`` one whose
``pytorch_model.bin`` carries a payload. The payload would create ``{marker}``; it must never
exist. The genuine counterparts load in test_checkpoint_security.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from braid.config import load_config
from braid.convert.hf_export import export_checkpoint, read_safetensors
from braid.trainer.trainer import Trainer
from checkpoint_plants import Payload, copy_run, plant_metadata, plant_rng
from conftest import ROOT, tiny_overrides
from mistakes import Mistake, run_mistake

STEP = "checkpoints/step_4"


def _train(run_dir: Path, **extra) -> list[str]:
    return ["-m", "braid.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides(run_dir, **{"train.steps": 4, "checkpoint.interval": 2, **extra})]


MISTAKES = [
    Mistake("to-hf, payload in .metadata",
            ["-m", "braid.convert", "to-hf", "--checkpoint", "{meta}/" + STEP, "--out", "{tmp}/hf"], ".metadata"),
    Mistake("eval, payload in .metadata",
            ["-m", "braid.eval", "--model", "{meta}/checkpoints/latest", "--perplexity", "--no-wandb"], ".metadata"),
    Mistake("generate, payload in .metadata",
            ["-m", "braid.generate", "--model", "{meta}", "--prompt", "x", "--max-new-tokens", "1"], ".metadata"),
    Mistake("init_from a checkpoint with a payload in .metadata",
            _train(Path("{tmp}/new"), **{"checkpoint.init_from": "{meta}/" + STEP}), "checkpoint.init_from"),
    Mistake("resume=<path> with a payload in rng_rank0.pt",
            _train(Path("{tmp}/new"), **{"checkpoint.resume": "{rng}/" + STEP}), "rng_rank0.pt"),
    Mistake("resume=auto, payload in the only checkpoint's .metadata",
            _train(Path("{only}"), **{"train.steps": 2}), "no older complete checkpoint loads either"),
    Mistake("from-hf of a pytorch_model.bin without --allow-pickle",
            ["-m", "braid.convert", "from-hf", "--hf", "{bin}", "--out", "{tmp}/imported"], "--allow-pickle"),
    Mistake("from-hf --allow-pickle of a pytorch_model.bin with a payload",
            ["-m", "braid.convert", "from-hf", "--hf", "{evil_bin}", "--out", "{tmp}/imported", "--allow-pickle"],
            "pytorch_model.bin would call posix.system"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mistakes")
    genuine = root / "genuine"
    Trainer(load_config(None, _train(genuine)[4:])).train()
    marker = root / "MARKER"
    meta, rng = copy_run(genuine, root / "meta"), copy_run(genuine, root / "rng")
    plant_metadata(meta / STEP, marker)
    plant_rng(rng / STEP, marker)
    only = root / "only"  # trained in place, so that the same command finds its own config
    Trainer(load_config(None, _train(only, **{"train.steps": 2})[4:])).train()
    plant_metadata(only / "checkpoints" / "step_2", marker)
    hf = root / "bin"
    export_checkpoint(genuine / STEP, hf)
    tensors = read_safetensors(hf)
    (hf / "model.safetensors").unlink()
    torch.save(tensors, hf / "pytorch_model.bin")
    evil = root / "evil_bin"
    shutil.copytree(hf, evil)
    torch.save({**tensors, "extra": Payload(marker)}, evil / "pytorch_model.bin")
    return {"meta": meta, "rng": rng, "only": only, "bin": hf, "evil_bin": evil, "marker": marker}


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_a_tampered_checkpoint_costs_one_line_and_runs_nothing(mistake, places, tmp_path):
    names = {k: str(v) for k, v in places.items()} | {"tmp": str(tmp_path)}
    m = Mistake(mistake.name, [a.format(**names) for a in mistake.argv], mistake.names, mistake.code)
    guard = next(places[k] for k in ("meta", "rng", "only", "bin", "evil_bin") if any(f"{{{k}}}" in a
                                                                                    for a in mistake.argv))
    line = run_mistake(m, guard=guard)
    assert not places["marker"].exists(), f"{m.name}: the payload ran"
    assert not (tmp_path / "hf").exists() and not (tmp_path / "imported").exists(), f"{m.name}: wrote output"
    if "payload in" in m.name and "only" not in m.name:
        assert "posix.system" in line, line
