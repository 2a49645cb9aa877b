"""Data inputs a user gets wrong cost one line: ``python -m braid.train data.source=<bad>`` and
``python -m braid.preprocess --input <bad>`` exit 2 with one ``braid: error:`` line naming the file,
no traceback, and write nothing. Each bad input is also checked in process (tests/test_data_inputs.py,
tests/test_data_indexed.py); here a few run by default as a user types them, the rest are slow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from braid.config import load_config
from braid.preprocess import preprocess
from conftest import ROOT, tiny_overrides
from mistakes import Mistake, run_mistake

slow = pytest.mark.slow

# (name, data.source under the inputs dir, what the error line names)
TRAIN = [
    ("random-bytes .jsonl", "rand.jsonl", "rand.jsonl': line 1 is not"),
    ("truncated .bin", "trunc", "trunc.bin' is"),
    ("random-bytes .txt", "rand.txt", "rand.txt' is not UTF-8 text"),
    pytest.param(".bin without .idx", "noidx", "noidx.bin' but no", marks=slow),
    pytest.param("mismatched pair", "mis", "mis.bin' is", marks=slow),
    pytest.param("prefix with its .bin suffix", "mis.bin", "without .bin/.idx", marks=slow),
    pytest.param("empty dir", "empty", "empty' holds no", marks=slow),
    pytest.param("dir of only non-UTF-8 files", "binaries", "binaries' holds no usable documents", marks=slow),
]
# (name, --input under the inputs dir, what the error line names)
PREPROCESS = [
    ("missing input", "missing.jsonl", "missing.jsonl' does not exist"),
    pytest.param("random-bytes .jsonl", "rand.jsonl", "rand.jsonl' holds no usable documents", marks=slow),
    pytest.param("random-bytes .txt", "rand.txt", "rand.txt' holds no usable documents", marks=slow),
    ("empty dir", "empty", "empty' is an empty directory"),  # fails before torch is imported: cheap
    pytest.param("dir of only non-UTF-8 files", "binaries", "binaries' holds no usable documents", marks=slow),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    pytest.importorskip("megatron.core")  # the .bin/.idx inputs are written by preprocess (optional on the GPU image)
    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(2305)
    (root / "rand.txt").write_bytes(rng.bytes(4000))
    (root / "rand.jsonl").write_bytes(rng.bytes(4000))
    (root / "empty").mkdir()
    (root / "binaries").mkdir()
    for name in ("a.txt", "b.md", "c.py"):
        (root / "binaries" / name).write_bytes(rng.bytes(2000))
    good = root / "good.jsonl"
    good.write_text("".join(f'{{"text": "document {i} {"abc " * 10}"}}\n' for i in range(100)))
    a = preprocess(str(good), "bytes", str(root / "a"), progress=False)["prefix"]
    good.write_text("".join(f'{{"text": "{i}"}}\n' for i in range(3)))
    b = preprocess(str(good), "bytes", str(root / "b"), progress=False)["prefix"]
    bin_a, idx_a = Path(a + ".bin").read_bytes(), Path(a + ".idx").read_bytes()
    (root / "trunc.bin").write_bytes(bin_a[:-100])
    (root / "trunc.idx").write_bytes(idx_a)
    (root / "noidx.bin").write_bytes(bin_a)
    (root / "mis.bin").write_bytes(bin_a)
    (root / "mis.idx").write_bytes(Path(b + ".idx").read_bytes())
    return root


def _train(root: Path, source: str, **extra) -> list[str]:
    return ["-m", "braid.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides(root / "run", **{"train.steps": 1, "data.source": str(root / source), **extra})]


@pytest.mark.parametrize("name, source, names", TRAIN)
def test_train_on_bad_data_costs_one_line(inputs, name, source, names):
    run_mistake(Mistake(name, _train(inputs, source), names), guard=inputs)
    assert not (inputs / "run").exists()


@pytest.mark.parametrize("name, source, names", PREPROCESS)
def test_preprocess_of_bad_input_costs_one_line_and_writes_nothing(inputs, name, source, names):
    argv = ["-m", "braid.preprocess", "--input", str(inputs / source), "--tokenizer", "bytes",
            "--output-prefix", str(inputs / "out" / "corpus"), "--workers", "1"]
    run_mistake(Mistake(name, argv, names), guard=inputs)
    assert not (inputs / "out").exists()


def test_one_text_file_trains(tmp_path):
    """What a nanoGPT user types: one text file; its tail is held out and evaluated."""
    corpus = tmp_path / "input.txt"
    corpus.write_text("\n\n".join(f"Speech {i}. " + "To be, or not to be, that is the question. " * 4
                                  for i in range(30)), encoding="utf-8")
    r = subprocess.run([sys.executable, *_train(tmp_path, "input.txt", **{"train.steps": 2})], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "validation at iteration 2" in r.stdout and "done at iteration 2" in r.stdout + r.stderr


def test_text_dir_with_a_binary_file_trains_with_one_warning(tmp_path, capsys, monkeypatch):
    from braid.trainer.trainer import Trainer

    monkeypatch.delenv("RANK", raising=False)
    data = tmp_path / "texts"
    data.mkdir()
    (data / "notes.txt").write_text("a plain text document, long enough to train on. " * 40, encoding="utf-8")
    (data / "dump.txt").write_bytes(np.random.default_rng(0).bytes(3000))
    losses = Trainer(load_config(None, _train(tmp_path, "texts", **{"train.steps": 2})[4:])).train()
    assert len(losses) == 2
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("braid: warning")]
    assert warnings == [f"braid: warning: data.source '{data}': skipped 1 of 2 files (1 not UTF-8 text; "
                        f"first: {data / 'dump.txt'})"]
