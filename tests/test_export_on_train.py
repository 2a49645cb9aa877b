"""checkpoint.export_hf (a HF directory after the last step) and checkpoint.init_from (a new run from
another run's or a HF directory's weights)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from braid.config import load_config
from braid.convert import load_model
from braid.errors import ConfigError
from braid.parallel.data_parallel import unwrap
from braid.trainer.trainer import Trainer
from conftest import tiny_overrides

X = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(3))


def trainer(run_dir: Path, **extra) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(run_dir, **extra)))


def hf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=X).logits


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(X)


def test_export_after_the_last_step(tmp_path):
    """The final model, as transformers and braid.convert load it from <run.dir>/hf."""
    tr = trainer(tmp_path / "r", **{"train.steps": 6, "checkpoint.interval": 4, "checkpoint.export_hf": "true"})
    tr.train()
    final = logits(unwrap(tr.model))
    hf = tmp_path / "r" / "hf"
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (hf_logits(hf) - final).abs().max().item() <= 1e-4
    assert (logits(load_model(hf)) - final).abs().max().item() <= 1e-4


def test_no_export_on_a_signal_stop_and_export_to_a_path(tmp_path, monkeypatch):
    stops = iter([False, True])
    monkeypatch.setattr(Trainer, "_should_stop", lambda self, received: next(stops))
    tr = trainer(tmp_path / "r", **{"train.steps": 6, "checkpoint.export_hf": str(tmp_path / "out")})
    tr.train()
    assert tr.stopped_by is not None and tr.step == 2
    assert (tmp_path / "r" / "checkpoints" / "step_2").is_dir() and not (tmp_path / "out").exists()
    monkeypatch.undo()  # resumed to the end: now it exports, to the path given
    trainer(tmp_path / "r", **{"train.steps": 4, "checkpoint.export_hf": str(tmp_path / "out")}).train()
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("key,value", [("checkpoint.export_hf", "''"), ("checkpoint.export_hf", "3"),
                                       ("checkpoint.init_from", "/no/such/dir")])
def test_bad_values_name_their_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(None, tiny_overrides(tmp_path / "r") + [f"{key}={value}"])
    assert len(str(info.value).splitlines()) == 1


def test_init_from_checkpoint_and_hf_dir(tmp_path):
    """Initial weights equal the source's; the new run starts at step 0 and trains; a run that has
    its own checkpoint resumes it instead; another shape is a one-line error naming the key."""
    trainer(tmp_path / "a", **{"train.steps": 4, "checkpoint.export_hf": "true"}).train()
    source = load_model(tmp_path / "a" / "checkpoints" / "latest").state_dict()
    for src in (tmp_path / "a" / "checkpoints" / "latest", tmp_path / "a" / "hf"):
        run_dir = tmp_path / f"b_{src.name}"
        tr = trainer(run_dir, **{"train.steps": 3, "checkpoint.init_from": str(src)})
        got = unwrap(tr.model).state_dict()
        assert sorted(got) == sorted(source)
        assert all(torch.equal(got[k], source[k]) for k in source), src
        losses = tr.train()
        assert tr.step == 3 and len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
        assert tr.init_notes[0].startswith("braid: initialised weights from")
    # b_latest has its own step_3 now: resume=auto wins over init_from, and says so.
    again = trainer(tmp_path / "b_latest", **{"train.steps": 3, "checkpoint.init_from": str(tmp_path / "a")})
    assert "ignored" in again.init_notes[0]
    with pytest.raises(ConfigError, match=r"checkpoint\.init_from") as info:
        trainer(tmp_path / "c", **{"model.d_model": 32, "checkpoint.init_from": str(tmp_path / "a")})
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(ConfigError, match=r"checkpoint\.init_from"):
        trainer(tmp_path / "d", **{"model.pattern": "AAA", "checkpoint.init_from": str(tmp_path / "a" / "hf")})


@pytest.mark.slow
def test_two_process_fsdp_run_exports_and_inits(tmp_path):
    """FSDP2 over 2 ranks: the export equals the final (sharded) checkpoint; a new 2-rank run starts
    from it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_parallel_train import launch, train_records

    first = tiny_overrides(tmp_path / "a", **{"train.steps": 4, "checkpoint.export_hf": "true",
                                              "parallel.dp_shard": 2})
    second = tiny_overrides(tmp_path / "b", **{"train.steps": 2, "parallel.dp_shard": 2,
                                               "checkpoint.init_from": str(tmp_path / "a" / "hf")})
    launch(tmp_path, 2, [first, second])
    final = logits(load_model(tmp_path / "a" / "checkpoints" / "latest"))
    assert (hf_logits(tmp_path / "a" / "hf") - final).abs().max().item() <= 1e-4
    # One process from the same weights follows the same trajectory: the ranks loaded them all.
    trainer(tmp_path / "one", **{"train.steps": 2, "checkpoint.init_from": str(tmp_path / "a" / "hf")}).train()
    got, ref = (train_records(tmp_path / d) for d in ("b", "one"))
    assert [r["step"] for r in got] == [1, 2]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
