"""Hugging Face streaming (local files, offline): online packing identical to in-memory packing,
weighted mixing, lanes, exact resume by global sample index, and dp=2 → dp=1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from braid.config import DataConfig
from braid.data.loader import SampleOrder, micro_batches
from braid.data.packing import PackedSequences, build_datasets
from braid.data.streaming import StreamingSequences, StreamPacker, parse_stream_sources
from braid.data.tokenizer import ByteTokenizer
from braid.errors import DataSourceError

pytest.importorskip("datasets")
EOS = 256
GB, MICRO = 8, 2


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _texts(seed: int, n: int, alphabet: str) -> list[str]:
    rng = np.random.default_rng(seed)
    return [alphabet[0] + "".join(rng.choice(list(alphabet), size=int(rng.integers(0, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    a, b = _texts(0, 80, "abcdefghij "), _texts(1, 80, "KLMNOPQRST\n")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in a))
    lines = [json.dumps({"text": t}) for t in b]
    lines[5] = json.dumps({"other": 1})  # malformed records are skipped, not fatal
    lines[9] = json.dumps({"text": ""})
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    return root, a, b


def _cfg(source: str, **kw) -> DataConfig:
    fields = dict(source=source, seq_len=16, valid_fraction=0.1, reset_position_ids=True, streaming=True,
                  stream_lanes=4)
    fields.update(kw)
    return DataConfig(**fields)


def test_stream_packer_equals_packed_sequences():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 200, size=int(k)).astype(np.int32) for k in rng.integers(0, 30, size=25)]
    for reset in (True, False):
        ref = PackedSequences(docs, EOS, 7, reset)
        packer, out = StreamPacker(EOS, 7, reset), []
        for d in docs:
            packer.add(d)
            while (s := packer.pop()) is not None:
                out.append(s)
        assert len(out) == len(ref)
        for i, s in enumerate(out):
            assert all(np.array_equal(s[k], ref[i][k]) and s[k].dtype == np.int64 for k in ref[i])


def test_one_lane_stream_equals_in_memory_packing(files):
    """With one lane the stream holds out the same documents as ``split_documents`` and packs them
    identically: streamed sample g == in-memory sample g (unshuffled)."""
    root, _, _ = files
    cfg = _cfg(str(root / "a.jsonl"), stream_lanes=1)
    train, valid = build_datasets(cfg, ByteTokenizer())
    ref_train, ref_valid = build_datasets(_cfg(str(root / "a.jsonl"), streaming=False), ByteTokenizer())
    assert isinstance(train, StreamingSequences) and len(ref_train) > 20
    for ds, ref in ((train, ref_train), (valid, ref_valid)):
        for g in range(len(ref)):
            assert all(np.array_equal(ds[g][k], ref[g][k]) for k in ref[g]), g
    # Past the end the stream cycles to its next epoch instead of ending.
    beyond = train[len(ref_train) + 3]["input_ids"]
    assert beyond.shape == (16,) and np.all(beyond <= EOS)


def _rows(ds_factory, start_step: int, steps: int, dp: int) -> list[list[int]]:
    """Input rows of global batches ``start_step..`` as the ranks of a dp-sized job read them (one
    fresh dataset per rank, as after a restart), concatenated in rank order."""
    rows = []
    datasets = [ds_factory() for _ in range(dp)]
    for step in range(start_step, start_step + steps):
        for rank in range(dp):
            ds = datasets[rank]
            order = SampleOrder(len(ds), seed=0, shuffle=ds.shuffle)
            rows += [r.tolist() for b in micro_batches(ds, order, step * GB, GB, MICRO, rank, dp, "cpu")
                     for r in b["input_ids"]]
    return rows


def test_streaming_resume_and_dp_change_are_exact(files):
    root, _, _ = files
    cfg = _cfg(f"{root / 'a.jsonl'} {root / 'b.jsonl'}")

    def make():
        return StreamingSequences(cfg, ByteTokenizer(), global_batch_size=GB)

    continuous = _rows(make, 0, 6, dp=1)
    assert len(set(map(tuple, continuous))) == len(continuous)  # no sample repeated
    assert _rows(make, 3, 3, dp=1) == continuous[3 * GB:]  # resume at step 3
    assert _rows(make, 3, 3, dp=2) == continuous[3 * GB:]  # ... on dp=2
    assert _rows(make, 0, 3, dp=4) == continuous[: 3 * GB]  # dp=4 from the start


def test_ranks_read_only_their_lanes(files):
    root, _, _ = files
    ds = StreamingSequences(_cfg(str(root / "a.jsonl")), ByteTokenizer(), global_batch_size=GB)
    order = SampleOrder(len(ds), 0, shuffle=False)
    micro_batches(ds, order, 2 * GB, GB, MICRO, 1, 2, "cpu")  # rank 1 of 2: lanes 2 and 3 of 4
    assert sorted(ds.lanes) == [2, 3]
    assert [ds.lane_of(g) for g in (0, 1, 2, 7, 8, 10)] == [(0, 0), (0, 1), (1, 0), (3, 1), (0, 2), (1, 2)]


def test_weighted_mixing(files):
    """Each lane follows the weights exactly (greedy rule): 1 of 4 samples from a, 3 from b."""
    root, _, _ = files
    cfg = _cfg(f"0.25 {root / 'a.jsonl'} 0.75 {root / 'b.jsonl'}", stream_lanes=2)
    ds = StreamingSequences(cfg, ByteTokenizer(), global_batch_size=GB)
    samples = [ds[g]["input_ids"] for g in range(32)]  # in order: each lane read once
    from_b = [bool(np.any((x >= ord("K")) & (x <= ord("T")))) for x in samples]
    from_a = [bool(np.any((x >= ord("a")) & (x <= ord("j")))) for x in samples]
    assert sum(from_b) == 24 and sum(from_a) == 8 and not any(x and y for x, y in zip(from_a, from_b))


def test_parquet_stream(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = _texts(3, 30, "xyz ")
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    ds = StreamingSequences(_cfg(str(tmp_path / "d.parquet"), stream_lanes=1), ByteTokenizer())
    kept = [t for i, t in enumerate(texts) if i % 10 != 5]
    stream = b"".join(t.encode() + bytes([0]) for t in kept)  # 0 stands for EOS
    got = bytes(int(x) if x != EOS else 0 for x in ds[0]["input_ids"]) + \
        bytes(int(x) if x != EOS else 0 for x in ds[1]["input_ids"])
    assert got == stream[:32]


def test_streaming_errors(files):
    root, _, _ = files
    with pytest.raises(DataSourceError, match="data.stream_lanes"):
        StreamingSequences(_cfg(str(root / "a.jsonl"), stream_lanes=3), ByteTokenizer(), global_batch_size=GB)
    with pytest.raises(DataSourceError, match="data.source"):
        parse_stream_sources(f"0.5 {root / 'a.jsonl'} 0.5")
    with pytest.raises(DataSourceError, match="data.source"):
        build_datasets(_cfg(str(root / "missing.jsonl")), ByteTokenizer())
    assert parse_stream_sources("x y") == [("x", 1.0), ("y", 1.0)]


def test_trainer_on_a_streaming_blend_resumes_bit_identically(tmp_path, files):
    """End to end through the unchanged trainer: a 2-source stream, resumed after step 4."""
    import shutil

    from braid.config import load_config
    from braid.trainer.trainer import Trainer
    from conftest import tiny_overrides

    root, _, _ = files
    extra = {"data.source": f"0.5 {root / 'a.jsonl'} 0.5 {root / 'b.jsonl'}", "data.streaming": True,
             "data.stream_lanes": 2, "data.seq_len": 16, "data.valid_fraction": 0.1, "train.steps": 8,
             "checkpoint.interval": 4}

    def run(d):
        return Trainer(load_config(None, tiny_overrides(d, **extra))).train()

    full = run(tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_4", tmp_path / "res" / "checkpoints" / "step_4")
    assert run(tmp_path / "res") == full[4:]


def test_banner_of_a_streaming_run_counts_no_sequences(tmp_path, files, capsys):
    """A stream's ``len`` is the sentinel ``loader.UNBOUNDED``, not a number of sequences to print."""
    import sys

    from braid.config import load_config
    from braid.trainer.trainer import Trainer
    from conftest import tiny_overrides

    root, _, _ = files
    extra = {"data.source": str(root / "a.jsonl"), "data.streaming": True, "data.stream_lanes": 2,
             "data.seq_len": 16, "data.valid_fraction": 0.1, "train.steps": 1}
    Trainer(load_config(None, tiny_overrides(tmp_path / "r", **extra))).train()
    banner = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("braid: run dir "))
    assert str(sys.maxsize) not in banner
    assert "| train stream / valid stream sequences of 16 |" in banner, banner
