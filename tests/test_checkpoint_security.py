"""Loading a checkpoint runs no code from it, and damage is found by checksums (README, Security).

One genuine tiny run (checkpoints at steps 2 and 4) is made per module and copied per test; payloads
are planted as ``tests/checkpoint_plants.py`` does (the manifest updated to match). Every load path
must refuse a payload without running it and still load the genuine checkpoint, so the allow-lists
are complete and not merely closed. The CLI forms of these mistakes are in test_mistakes_checkpoint.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from braid.config import load_config
from braid.convert import load as convert_load
from braid.convert.braid_checkpoint import load_braid_checkpoint
from braid.convert.init_weights import load_init_weights
from braid.errors import CheckpointError, ConfigError
from braid.inspect import summarize
from braid.models.hybrid import HybridLM
from braid.trainer import checksums
from braid.trainer.checkpoint import load_rng_file, rng_state, set_rng_state
from braid.trainer.safe_load import read_dcp_metadata
from braid.trainer.safe_pickle import UnsafeCheckpointFile, load_metadata_bytes
from braid.trainer.trainer import Trainer
from checkpoint_plants import (
    Payload,
    copy_run,
    plant_metadata,
    plant_rng,
    plant_shard_value,
    plant_torch_file,
    refresh_manifest,
)
from conftest import ROOT, tiny_overrides

SETTINGS = {"train.steps": 4, "checkpoint.interval": 2}


def train(run_dir: Path, **extra) -> tuple[Trainer, list[float]]:
    trainer = Trainer(load_config(None, tiny_overrides(run_dir, **{**SETTINGS, **extra})))
    return trainer, trainer.train()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> tuple[Path, list[float]]:
    run_dir = tmp_path_factory.mktemp("genuine") / "run"
    _, losses = train(run_dir)
    return run_dir, losses


@pytest.fixture
def run_copy(genuine, tmp_path) -> Path:
    return copy_run(genuine[0], tmp_path / "run")


PLANTS = {"metadata": plant_metadata, "rng": plant_rng, "shard_value": plant_shard_value}


@pytest.mark.parametrize("where", list(PLANTS))
def test_resume_sets_a_planted_newest_checkpoint_aside_without_running_it(genuine, run_copy, tmp_path, where,
                                                                         capsys):
    marker = tmp_path / "MARKER"
    name = PLANTS[where](run_copy / "checkpoints" / "step_4", marker)
    capsys.readouterr()
    trainer, losses = train(run_copy, **{"train.steps": 4})
    out = capsys.readouterr().out
    assert not marker.exists()
    said = [ln for ln in out.splitlines() if "warning" in ln]
    assert len(said) == 1 and name in said[0] and "posix.system" in said[0], said
    assert "set aside as step_4.damaged, falling back to step_2" in said[0]
    assert "resumed from" in out and "at iteration 2" in out
    assert losses == genuine[1][2:]  # the genuine step_2 loaded, bit-exact from there


def test_a_genuine_checkpoint_loads_through_every_path(genuine, tmp_path, capsys):
    run_dir, losses = genuine
    ckpt = run_dir / "checkpoints" / "step_4"
    # resume (and the RNG file, DCP metadata and trainer values through the restricted readers)
    copy = copy_run(run_dir, tmp_path / "resume")
    trainer, _ = train(copy, **{"checkpoint.resume": str(copy / "checkpoints" / "step_2")})
    assert trainer.step == 4 and "warning" not in capsys.readouterr().out
    # to-hf / eval / generate (braid.convert.load), and checkpoint.init_from
    model, cfg = load_braid_checkpoint(ckpt)
    assert convert_load(run_dir).model.state_dict().keys() == model.state_dict().keys()
    fresh = HybridLM(cfg.model).float()
    load_init_weights(fresh, ckpt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    # braid.inspect
    assert all(c["problem"] is None for c in summarize(run_dir)["checkpoints"])


def test_convert_and_init_from_refuse_a_planted_checkpoint(genuine, run_copy, tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = run_copy / "checkpoints" / "step_4"
    model = HybridLM(load_braid_checkpoint(genuine[0])[1].model).float()
    plant_metadata(ckpt, marker)
    with pytest.raises(CheckpointError, match=r"step_4' is damaged: \.metadata would call posix\.system"):
        load_braid_checkpoint(ckpt)
    with pytest.raises(ConfigError, match=r"checkpoint\.init_from.*\.metadata would call posix\.system"):
        load_init_weights(model, ckpt)
    # Trainer values are not weights: reading the weights never unpickles them.
    plant_shard_value(copy_run(genuine[0], tmp_path / "other") / "checkpoints" / "step_4", marker)
    load_init_weights(model, tmp_path / "other" / "checkpoints" / "step_4")
    assert not marker.exists()


def test_inspect_reports_a_planted_metadata_file_without_running_it(run_copy, tmp_path):
    marker = tmp_path / "MARKER"
    plant_metadata(run_copy / "checkpoints" / "step_4", marker)
    problems = {c["step"]: c["problem"] for c in summarize(run_copy)["checkpoints"]}
    assert problems[2] is None and "posix.system" in problems[4]
    out = subprocess.run([sys.executable, "-m", "braid.inspect", str(run_copy)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert [ln for ln in out.stdout.splitlines() if "DAMAGED" in ln and "posix.system" in ln]
    assert not marker.exists()


def test_metadata_allow_list_resolves_what_dcp_writes_and_nothing_else(genuine, tmp_path):
    ckpt = genuine[0] / "checkpoints" / "step_4"
    data = (ckpt / ".metadata").read_bytes()
    assert read_dcp_metadata(ckpt) == pickle.loads(data)
    marker = tmp_path / "MARKER"
    for evil in (Payload(marker), torch.load, io.open, pickle.loads):
        bad = pickle.dumps({"x": evil})
        for resolve in (True, False):
            with pytest.raises(UnsafeCheckpointFile, match=r"\.metadata would call"):
                load_metadata_bytes(bad, resolve=resolve)
    # A torch name that is not a constant is refused even when its module is allowed.
    sneaky = b"\x80\x04\x8c\x05torch\x8c\x04load\x93."  # protocol 4: STACK_GLOBAL torch.load
    with pytest.raises(UnsafeCheckpointFile, match=r"torch\.load"):
        load_metadata_bytes(sneaky)
    assert not marker.exists()


def test_rng_state_holds_only_tensors_and_numbers_and_round_trips(tmp_path):
    np.random.standard_normal()  # leave numpy a cached gaussian, Python one too
    random.gauss(0, 1)
    saved = rng_state()
    path = tmp_path / "rng.pt"
    torch.save(saved, path)
    want = (torch.rand(3), np.random.standard_normal(3), np.random.standard_normal(), random.random(),
            random.gauss(0, 1))
    set_rng_state(load_rng_file(path))  # weights_only=True, nothing more allowed
    got = (torch.rand(3), np.random.standard_normal(3), np.random.standard_normal(), random.random(),
           random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]


def test_rng_files_of_older_checkpoints_still_load_and_their_payloads_do_not(tmp_path):
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(legacy, tmp_path / "old.pt")
    set_rng_state(load_rng_file(tmp_path / "old.pt"))
    want = np.random.random(), random.random()
    set_rng_state(load_rng_file(tmp_path / "old.pt"))
    assert (np.random.random(), random.random()) == want
    marker = tmp_path / "MARKER"
    torch.save({**legacy, "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointFile, match=r"evil\.pt would call posix\.system"):
        load_rng_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_manifest_checksums_cover_every_file_and_each_rank_hashes_its_own(run_copy):
    ckpt = run_copy / "checkpoints" / "step_4"
    meta = checksums.files_of(ckpt)
    recorded = json.loads((ckpt / "COMPLETE").read_text())["checksums"]
    assert sorted(recorded) == sorted(n for n in meta if n != "COMPLETE")
    assert all(checksums.file_checksum(ckpt / n) == s for n, s in recorded.items())
    # A file written after the ranks hashed (rank 0, just before the manifest) is covered too.
    (ckpt / "late.yaml").write_text("x: 1\n")
    assert "late.yaml" in checksums.complete_checksums(ckpt, checksums.gather_checksums(ckpt, 0, 1))
    assert [checksums.owner(n, 4) for n in ("__3_0.distcp", "rng_rank2.pt", ".metadata",
                                            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                            "deepspeed/mp_rank_00_model_states.pt")] == [3, 2, 0, 1, 0]
    assert checksums.owner("__5_0.distcp", 2) == 1  # resumed on fewer ranks: shared out again


def test_bytes_overwritten_at_the_same_size_are_found_and_verify_false_skips_the_check(run_copy, capsys):
    ckpt = run_copy / "checkpoints" / "step_4"
    # 4 KB of NaNs in the middle of the largest tensor: the file still loads, only its bytes changed.
    info = max(read_dcp_metadata(ckpt).storage_data.values(), key=lambda i: i.length)
    shard = ckpt / info.relative_path
    data = bytearray(shard.read_bytes())
    start = info.offset + info.length // 2
    data[start:start + 4096] = b"\x00\x00\xc0\x7f" * 1024
    shard.write_bytes(bytes(data))
    copy = copy_run(run_copy, run_copy.parent / "unverified")
    capsys.readouterr()
    trainer, _ = train(run_copy)
    said = [ln for ln in capsys.readouterr().out.splitlines() if "warning" in ln]
    assert len(said) == 1 and shard.name in said[0] and "checksum" in said[0] and "falling back to step_2" in said[0]
    assert trainer.step == 4
    trainer, losses = train(copy, **{"checkpoint.verify": "false", "train.steps": 5})
    out = capsys.readouterr().out
    assert "warning" not in out and "step_4 at iteration 4" in out and len(losses) == 1  # loaded, damage and all


def test_from_hf_reads_pytorch_model_bin_only_when_allowed_and_weights_only(genuine, tmp_path):
    from braid.convert.__main__ import main as convert_main
    from braid.convert.hf_export import export_checkpoint, read_safetensors

    hf = tmp_path / "hf"
    export_checkpoint(genuine[0] / "checkpoints" / "step_4", hf)
    tensors = read_safetensors(hf)
    torch.save(tensors, hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*--allow-pickle"):
        read_safetensors(hf)
    assert convert_main(["from-hf", "--hf", str(hf), "--out", str(tmp_path / "imported"), "--allow-pickle"]) == 0
    imported = load_braid_checkpoint(tmp_path / "imported")[0].state_dict()
    assert all(torch.equal(imported[k], v) for k, v in load_braid_checkpoint(genuine[0])[0].state_dict().items())
    marker = tmp_path / "MARKER"
    torch.save({**tensors, "extra": Payload(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin would call posix\.system"):
        read_safetensors(hf, allow_pickle=True)
    assert not marker.exists()


def test_refresh_manifest_is_what_a_tamperer_does(run_copy):
    """The plants above pass the size and checksum checks: only the restricted readers stop them."""
    ckpt = run_copy / "checkpoints" / "step_4"
    (ckpt / "rng_rank0.pt").write_bytes((ckpt / "rng_rank0.pt").read_bytes() + b"\0")
    refresh_manifest(ckpt)
    from braid.trainer.checkpoint_layout import checkpoint_problem

    expected = json.loads((ckpt / "COMPLETE").read_text())["checksums"]
    assert checkpoint_problem(ckpt) is None and checksums.mismatch(ckpt, expected) is None


@pytest.mark.slow
def test_deepspeed_resume_loads_its_files_weights_only(tmp_path):
    """DeepSpeed unpickles its own files; braid makes it use weights_only=True with an allow-list of
    what ZeRO files hold: a payload in the newest optimizer partition is set aside, step_2 loads.
    Slow: two fresh processes importing DeepSpeed (~100 s on 2 shared cores)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    env.pop("TRITON_INTERPRET", None)
    run_dir = tmp_path / "ds"
    argv = [sys.executable, "-m", "braid.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides(run_dir, **{**SETTINGS, "parallel.engine": "deepspeed", "parallel.zero_stage": 1})]
    first = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=280)
    assert first.returncode == 0, first.stderr[-3000:]
    losses = [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    ckpt = run_dir / "checkpoints" / "step_4"
    marker = tmp_path / "MARKER"
    name = plant_torch_file(ckpt / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    refresh_manifest(ckpt)
    again = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=280)
    out = again.stdout + again.stderr
    assert again.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert not marker.exists()
    said = [ln for ln in out.splitlines() if ln.startswith("braid: warning")]
    assert len(said) == 1 and name in said[0] and "posix.system" in said[0] and "falling back to step_2" in said[0]
    resumed = [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in ln]
    assert resumed == losses  # steps 1-2 kept, 3-4 trained again from the genuine step_2, identically


def test_checksums_without_xxhash_fall_back_to_crc32(tmp_path, monkeypatch):
    """Where xxhash is not installed (the GPU image), manifests record crc32 and damage is still caught."""
    from braid.trainer import checksums

    f = tmp_path / "shard.bin"
    f.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setattr(checksums, "xxhash", None)
    monkeypatch.setattr(checksums, "ALGORITHM", "crc32")
    want = {"shard.bin": checksums.file_checksum(f)}
    assert want["shard.bin"].startswith("crc32:") and checksums.mismatch(tmp_path, want) is None
    f.write_bytes(b"\xff" + f.read_bytes()[1:])
    assert "does not match" in checksums.mismatch(tmp_path, want)
