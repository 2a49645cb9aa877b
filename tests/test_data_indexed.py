"""Preprocessing into Megatron .bin/.idx (megatron-core), training samples from one prefix and from a
weighted blend, malformed inputs, and exact resume on indexed data (also dp=2 → dp=1)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from braid.config import DataConfig, load_config
from braid.data.indexed import doc_ids_from_eos, parse_blend, positions_from_doc_ids
from braid.data.loader import SampleOrder, micro_batches
from braid.data.packing import build_datasets
from braid.data.tokenizer import ByteTokenizer
from braid.errors import DataSourceError
from braid.preprocess import preprocess
from conftest import ROOT, tiny_overrides

EOS = 256
pytest.importorskip("megatron.core")


def _indexed(prefix: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def _texts(seed: int, n: int, alphabet: str) -> list[str]:
    rng = np.random.default_rng(seed)
    return [alphabet[0] + "".join(rng.choice(list(alphabet), size=int(rng.integers(3, 60)))) for _ in range(n)]


def _write_jsonl(path, texts):
    path.write_bytes(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two preprocessed sources with disjoint alphabets (so a sample tells which source it is from)."""
    root = tmp_path_factory.mktemp("indexed")
    out = {}
    for name, seed, alphabet in (("a", 0, "abcdefghij "), ("b", 1, "KLMNOPQRST\n")):
        texts = _texts(seed, 120, alphabet)
        _write_jsonl(root / f"{name}.jsonl", texts)
        stats = preprocess(str(root / f"{name}.jsonl"), "bytes", str(root / name / "docs"), workers=1, progress=False)
        assert stats["documents"] == len(texts)
        prefix = stats["prefix"]
        out[name] = (prefix, texts)
    return out


# ----------------------------------------------------------------------------- preprocess


def test_preprocess_round_trip_with_eos(corpus):
    prefix, texts = corpus["a"]
    ds = _indexed(prefix)
    assert len(ds) == len(texts)
    for i in (0, 7, len(texts) - 1):
        expected = list(texts[i].encode()) + [EOS]
        assert ds[i].tolist() == expected
    assert ds[0].dtype == np.uint16  # vocab 257 fits


def test_preprocess_skips_and_counts_malformed_records_and_splits_a_huge_document(tmp_path):
    good = ["first good document", "second — ünïcode", "third"]
    huge = "word " * 2_000_000 + "end"  # a 10 MB single document
    path = tmp_path / "messy.jsonl"
    path.write_bytes(
        json.dumps({"text": good[0]}).encode() + b"\n"
        + b"\n"  # empty line
        + b"   \n"  # blank line
        + b'{"text": "bad \xff\xfe bytes"}\n'  # invalid UTF-8
        + b"{not json\n"  # not JSON
        + b'["a list"]\n'  # JSON, not an object
        + b'{"body": "no text field"}\n'
        + b'{"text": 17}\n'  # not a string
        + b'{"text": ""}\n'  # empty text
        + json.dumps({"text": good[1]}).encode() + b"\n"
        + json.dumps({"text": huge}).encode() + b"\n"
        + json.dumps({"text": good[2]}).encode()  # no final newline
    )
    stats = preprocess(str(path), "bytes", str(tmp_path / "out" / "messy"), workers=1, progress=False)
    assert stats["skipped"] == {"empty": 3, "undecodable": 1, "malformed": 4}
    assert stats["documents"] == 4 and stats["split_documents"] == 1
    assert json.loads((tmp_path / "out" / "messy_text_document.stats.json").read_text()) == stats
    ds = _indexed(stats["prefix"])
    assert [ds[i].tolist() for i in (0, 1, 3)] == [list(t.encode()) + [EOS] for t in good]
    big = ds[2]
    assert len(big) == len(huge) + 1 and big[-1] == EOS
    assert np.array_equal(big[:-1], np.frombuffer(huge.encode(), np.uint8))  # the pieces rejoin exactly


def test_preprocess_parquet_and_text_dir(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["p one", None, "", "p two"]}), tmp_path / "d.parquet")
    stats = preprocess(str(tmp_path / "d.parquet"), "bytes", str(tmp_path / "pq"), progress=False)
    assert stats["documents"] == 2 and stats["skipped"] == {"empty": 1, "malformed": 1}
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("text file a")
    (docs / "b.md").write_text("text file b")
    (docs / "c.txt").write_bytes(b"\xff\xfe\xfd")
    stats = preprocess(str(docs), "bytes", str(tmp_path / "txt"), progress=False)
    assert stats["documents"] == 2 and stats["skipped"] == {"undecodable": 1}
    ds = _indexed(stats["prefix"])
    assert ds[1].tolist() == list(b"text file b") + [EOS]


@pytest.mark.slow  # two spawned workers import torch: ~20 s on a busy 2-core machine
def test_preprocess_cli_with_workers_matches_one_process(tmp_path, corpus):
    """Two worker processes write byte-identical files (order kept), and the CLI reports the counts."""
    prefix, _ = corpus["a"]
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, _texts(0, 120, "abcdefghij "))
    with src.open("ab") as f:
        f.write(b"{broken\n")
    out = subprocess.run([sys.executable, "-m", "braid.preprocess", "--input", str(src), "--tokenizer", "bytes",
                          "--output-prefix", str(tmp_path / "p"), "--workers", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "120 documents" in out.stdout and "1 malformed" in out.stdout
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"p_text_document{ext}").read_bytes() == open(prefix + ext, "rb").read()


def test_preprocess_cli_bad_tokenizer_exits_2(tmp_path, capsys):
    from braid.preprocess import main

    src = tmp_path / "in.jsonl"
    _write_jsonl(src, ["x"])
    assert main(["--input", str(src), "--tokenizer", str(tmp_path / "nope"), "--output-prefix",
                 str(tmp_path / "p")]) == 2
    assert "data.tokenizer" in capsys.readouterr().err and sorted(tmp_path.iterdir()) == [src]


# ----------------------------------------------------------------------------- samples


def test_doc_ids_and_positions_from_eos():
    ids = np.array([5, 6, EOS, 7, EOS, EOS, 8, 9])
    doc_ids = doc_ids_from_eos(ids, EOS)
    assert doc_ids.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert positions_from_doc_ids(doc_ids).tolist() == [0, 1, 2, 0, 1, 0, 0, 1]


def _check_windows(ds, docs: set[tuple[int, ...]], seq_len: int, n: int, reset: bool = True):
    """Every sample is a window of the EOS-separated document stream: whole documents in the middle,
    a suffix first and a prefix last; labels are inputs shifted; doc_ids/positions follow the EOS."""
    for i in range(n):
        s = ds[i]
        assert all(v.shape == (seq_len,) and v.dtype == np.int64 for v in s.values())
        window = np.append(s["input_ids"], s["labels"][-1])
        assert np.array_equal(s["labels"][:-1], s["input_ids"][1:])
        pieces = [tuple(p) for p in np.split(window, np.flatnonzero(window == EOS) + 1)]
        ends_doc = [bool(p) and p[-1] == EOS for p in pieces]
        pieces = [p[:-1] if e else p for p, e in zip(pieces, ends_doc)]
        for p in pieces[1:-1]:
            assert p in docs
        first, last = pieces[0], pieces[-1]
        if len(pieces) == 1:  # inside one document
            assert any(bytes(first) in bytes(d) for d in docs)
        else:
            assert any(d[len(d) - len(first):] == first for d in docs)
            assert any(d[: len(last)] == last for d in docs)
        assert np.array_equal(s["doc_ids"], doc_ids_from_eos(s["input_ids"], EOS))
        positions = positions_from_doc_ids(s["doc_ids"]) if reset else np.arange(seq_len)
        assert np.array_equal(s["position_ids"], positions)


def test_indexed_source_samples(corpus):
    prefix, texts = corpus["a"]
    cfg = DataConfig(source=prefix, seq_len=16, valid_fraction=0.1, reset_position_ids=True)
    train, valid = build_datasets(cfg, ByteTokenizer())
    docs = {tuple(t.encode()) for t in texts}
    total = sum(len(t) + 1 for t in texts)
    assert 0.8 * total / 16 < len(train) < 0.95 * total / 16 and len(valid) >= 1  # one epoch of 90 %
    _check_windows(train, docs, 16, 40)
    _check_windows(valid, docs, 16, len(valid))
    # megatron-core cached the indices next to the data (a second build reuses them).
    assert any(Path(prefix).parent.rglob("*.npy"))
    assert [train[i]["input_ids"].tolist() for i in range(5)] == \
        [x["input_ids"].tolist() for x in (build_datasets(cfg, ByteTokenizer())[0][i] for i in range(5))]


def test_weighted_blend_mixes_by_weight(corpus, tmp_path):
    (pa, ta), (pb, tb) = corpus["a"], corpus["b"]
    cfg = DataConfig(source=f"0.25 {pa} 0.75 {pb}", seq_len=16, valid_fraction=0.1, cache_dir=str(tmp_path))
    train, _ = build_datasets(cfg, ByteTokenizer(), num_samples=400)
    assert len(train) >= 400
    assert any(tmp_path.rglob("*.npy"))  # data.cache_dir honoured
    from_b = [bool(np.any((train[i]["input_ids"] >= ord("K")) & (train[i]["input_ids"] <= ord("T"))))
              for i in range(400)]
    assert abs(sum(from_b) / 400 - 0.75) < 0.02
    docs = {tuple(t.encode()) for t in ta + tb}
    _check_windows(train, docs, 16, 30, reset=False)


def test_blend_parsing_errors(corpus):
    prefix, _ = corpus["a"]
    assert parse_blend(prefix) == ([prefix], None)
    assert parse_blend(f"1 {prefix} 3 {prefix}") == ([prefix, prefix], [1.0, 3.0])
    assert parse_blend("embedded") is None
    for bad in (f"0.3 {prefix} 0.7", f"0.3 {prefix} x {prefix}", f"0 {prefix}", f"1 {prefix}_missing"):
        with pytest.raises(DataSourceError, match="data.source"):
            parse_blend(bad)


def test_indexed_resume_and_dp_change_see_the_same_samples(corpus):
    """Global sample g is the same sample whatever dp and whichever process (fresh objects)."""
    prefix, _ = corpus["a"]
    cfg = DataConfig(source=prefix, seq_len=16, valid_fraction=0.1)
    gb, micro = 8, 2

    def rows(dp, rank, start):
        train, _ = build_datasets(cfg, ByteTokenizer(), seed=7)
        order = SampleOrder(len(train), seed=7)
        return [r.tolist() for b in micro_batches(train, order, start, gb, micro, rank, dp, "cpu")
                for r in b["input_ids"]]

    continuous = [row for step in range(4) for row in rows(1, 0, step * gb)]
    two_ranks = [row for step in range(2, 4) for rank in range(2) for row in rows(2, rank, step * gb)]
    assert two_ranks == continuous[2 * gb:]  # resumed at step 2 on dp=2: same samples, same order


def test_train_on_indexed_blend_resumes_bit_identically(tmp_path, corpus):
    """End to end: the trainer on a 2-source blend; a resume gives bit-identical losses."""
    from braid.trainer.trainer import Trainer

    (pa, _), (pb, _) = corpus["a"], corpus["b"]
    extra = {"data.source": f"0.4 {pa} 0.6 {pb}", "data.seq_len": 16, "data.valid_fraction": 0.1,
             "train.steps": 8, "checkpoint.interval": 4}

    def run(d):
        return Trainer(load_config(None, tiny_overrides(d, **extra))).train()

    full = run(tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_4", tmp_path / "res" / "checkpoints" / "step_4")
    assert run(tmp_path / "res") == full[4:]


# ----------------------------------------------------------------------------- what preprocess writes


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_preprocess_names_its_output_as_megatron_does(tmp_path, capsys):
    """Megatron's preprocess_data.py writes <prefix>_<json key>_document; data.source takes that name."""
    from braid.preprocess import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}", "body": f"body {i}"}) + "\n" for i in range(3)))
    assert main(["--input", str(src), "--tokenizer", "bytes", "--output-prefix", str(tmp_path / "out" / "corpus"),
                 "--workers", "1"]) == 0
    prefix = str(tmp_path / "out" / "corpus_text_document")
    assert f"data.source={prefix}" in capsys.readouterr().out
    stats = preprocess(str(src), "bytes", str(tmp_path / "out" / "corpus"), text_field="body", progress=False)
    assert stats["prefix"] == str(tmp_path / "out" / "corpus_body_document")
    assert _listing(tmp_path / "out") == [f"corpus_{k}_document{ext}" for k in ("body", "text")
                                          for ext in (".bin", ".idx", ".stats.json")]
    assert parse_blend(prefix) == ([prefix], None)
    ds = _indexed(stats["prefix"])  # held while reading: its __del__ unmaps the data
    assert ds[2].tolist() == list(b"body 2") + [EOS]


@pytest.mark.parametrize("make, names", [
    (lambda d: d / "missing.jsonl", "missing.jsonl' does not exist"),
    (lambda d: (d / "noise.jsonl").write_bytes(np.random.default_rng(0).bytes(4000)) and d / "noise.jsonl",
     "noise.jsonl' holds no usable documents (skipped: "),
    (lambda d: (d / "noise.txt").write_bytes(np.random.default_rng(1).bytes(4000)) and d / "noise.txt",
     "noise.txt' holds no usable documents (skipped: 1 not UTF-8 text"),
    (lambda d: (d / "bad.jsonl").write_text('{"body": 1}\n\n[2]\n') and d / "bad.jsonl",
     "(skipped: 1 empty (first: bad.jsonl line 2), 2 not a JSON object"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "empty' is an empty directory"),
    (lambda d: d / "in.csv", "in.csv' does not exist"),
])
def test_preprocess_of_unusable_input_writes_nothing(tmp_path, make, names):
    source = make(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(DataSourceError) as info:
        preprocess(str(source), "bytes", str(tmp_path / "new" / "dir" / "corpus"), progress=False)
    assert names in str(info.value)
    assert _listing(tmp_path) == before  # no .bin, no partial files, not even the output directories


def test_interrupted_preprocess_leaves_an_older_dataset_as_it_was(tmp_path, monkeypatch):
    import braid.preprocess as pre

    src = tmp_path / "in.jsonl"
    _write_jsonl(src, _texts(0, 40, "abcdef "))
    pre.preprocess(str(src), "bytes", str(tmp_path / "corpus"), progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p != src}
    encode, calls = pre._encode_chunk, []

    def interrupted(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C halfway through the second run
        return encode(texts)

    monkeypatch.setattr(pre, "_encode_chunk", interrupted)
    _write_jsonl(src, _texts(1, 40, "uvwxyz "))
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess(str(src), "bytes", str(tmp_path / "corpus"), chunk_docs=8, progress=False)
    assert calls == [8, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, src.name])  # no partial files
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


@pytest.mark.slow  # a fresh process on an input big enough to be stopped halfway: ~15 s
def test_sigterm_during_preprocess_leaves_nothing(tmp_path):
    import signal
    import time

    src = tmp_path / "big.jsonl"
    src.write_text(f'{{"text": "{"a short document " * 4}"}}\n' * 1_000_000)
    proc = subprocess.Popen([sys.executable, "-m", "braid.preprocess", "--input", str(src), "--tokenizer", "bytes",
                             "--output-prefix", str(tmp_path / "out" / "corpus"), "--workers", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((tmp_path / "out").glob(".*.partial/*.bin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well into writing
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "Traceback" not in err
    assert _listing(tmp_path) == ["big.jsonl"]


# ----------------------------------------------------------------------------- checked .bin/.idx pairs


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


PAIR_DAMAGE = {
    # name: (new .bin from (bin, other bin), new .idx from (idx, other idx), what the message names)
    "truncated bin": (lambda b, ob: b[:-10], lambda i, oi: i, "pair.bin' is"),
    "bin with extra bytes": (lambda b, ob: b + b"\0\0", lambda i, oi: i, "the pair does not match"),
    "mismatched pair": (lambda b, ob: b, lambda i, oi: oi, "pair.bin' is"),
    "bad magic": (lambda b, ob: b, lambda i, oi: _patched(i, 0, b"X"), "pair.idx' is not a Megatron index"),
    "bad version": (lambda b, ob: b, lambda i, oi: _patched(i, 9, struct.pack("<Q", 2)), "index version 2"),
    "bad dtype code": (lambda b, ob: b, lambda i, oi: _patched(i, 17, b"\x63"), "unknown token dtype code 99"),
    "idx cut short": (lambda b, ob: b, lambda i, oi: i[:-8], "pair.idx' is"),
    "idx header cut": (lambda b, ob: b, lambda i, oi: i[:20], "pair.idx' is cut short"),
    "bad document index": (lambda b, ob: b, lambda i, oi: i[:-8] + struct.pack("<q", 7), "pair.idx' is damaged"),
}


@pytest.mark.parametrize("damage", list(PAIR_DAMAGE))
def test_indexed_pair_is_checked_before_megatron_reads_it(tmp_path, corpus, damage):
    (pa, _), (pb, _) = corpus["a"], corpus["b"]
    make_bin, make_idx, names = PAIR_DAMAGE[damage]
    read = lambda p, ext: Path(p + ext).read_bytes()  # noqa: E731
    (tmp_path / "pair.bin").write_bytes(make_bin(read(pa, ".bin"), read(pb, ".bin")))
    (tmp_path / "pair.idx").write_bytes(make_idx(read(pa, ".idx"), read(pb, ".idx")))
    prefix = str(tmp_path / "pair")
    for source in (prefix, f"1 {pa} 1 {prefix}"):
        with pytest.raises(DataSourceError, match="data.source") as info:
            parse_blend(source)
        assert names in str(info.value) and prefix in str(info.value)


def test_half_a_pair_names_the_missing_file(tmp_path, corpus):
    pa, _ = corpus["a"]
    shutil.copy(pa + ".bin", tmp_path / "only.bin")
    shutil.copy(pa + ".idx", tmp_path / "idxonly.idx")
    cases = {str(tmp_path / "only"): f"has '{tmp_path}/only.bin' but no '{tmp_path}/only.idx'",
             str(tmp_path / "idxonly"): f"has '{tmp_path}/idxonly.idx' but no '{tmp_path}/idxonly.bin'",
             pa + ".bin": f"named by its prefix, without .bin/.idx (data.source={pa})",
             f"0.5 {pa} 0.5 {tmp_path / 'only'}": "only.bin' but no"}
    for source, message in cases.items():
        with pytest.raises(DataSourceError) as info:
            build_datasets(DataConfig(source=source, seq_len=16), ByteTokenizer())
        assert message in str(info.value)


def test_too_few_documents_for_megatron_split_say_so(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single long document " * 40)
    prefix = preprocess(str(one), "bytes", str(tmp_path / "one"), progress=False)["prefix"]
    with pytest.raises(DataSourceError, match=r"holds 1 document, and megatron-core holds out whole documents"):
        build_datasets(DataConfig(source=prefix, seq_len=16, cache_dir=str(tmp_path / "c")), ByteTokenizer())
    src = tmp_path / "ten.jsonl"
    _write_jsonl(src, _texts(0, 10, "abcdef "))
    prefix = preprocess(str(src), "bytes", str(tmp_path / "ten"), progress=False)["prefix"]
    with pytest.raises(DataSourceError, match=r"holds 10 document\(s\).*valid_fraction=0.01 leaves no held-out"):
        build_datasets(DataConfig(source=prefix, seq_len=16, cache_dir=str(tmp_path / "c")), ByteTokenizer())
    train, valid = build_datasets(DataConfig(source=prefix, seq_len=16, valid_fraction=0.2,
                                             cache_dir=str(tmp_path / "c")), ByteTokenizer())
    assert len(train) > 0 and len(valid) > 0
