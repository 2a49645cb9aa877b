"""Local data inputs, in process: one text file splits by token position, files that are not UTF-8
text are refused (alone) or skipped with one warning (in a directory), JSON lines errors name the line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from braid.config import DataConfig
from braid.data.packing import build_datasets, split_tokens
from braid.data.sources import load_documents
from braid.data.tokenizer import ByteTokenizer
from braid.errors import DataSourceError


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def _prose(n_paragraphs: int) -> str:
    return "\n\n".join(f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * 3
                       for i in range(n_paragraphs))


# ----------------------------------------------------------------------------- one text file


@pytest.mark.parametrize("valid_fraction", [0.01, 0.1, 0.5])
def test_one_text_file_holds_out_its_tail(tmp_path, valid_fraction):
    """nanoGPT's split: the last valid_fraction of the tokens (at least one sequence), disjoint and
    deterministic; the two parts concatenate back to the file."""
    path = tmp_path / "corpus.txt"
    path.write_text(_prose(40), encoding="utf-8")
    cfg = DataConfig(source=str(path), tokenizer="bytes", seq_len=32, valid_fraction=valid_fraction)
    train, valid = build_datasets(cfg, ByteTokenizer())
    tokens = np.frombuffer(path.read_bytes(), np.uint8)
    n_valid = max(32, round(len(tokens) * valid_fraction))
    eos = ByteTokenizer().eos_id
    assert np.array_equal(train.tokens, np.append(tokens[:-n_valid], eos))
    assert np.array_equal(valid.tokens, np.append(tokens[-n_valid:], eos))
    assert len(train) > 0 and len(valid) >= 1
    again = build_datasets(cfg, ByteTokenizer())
    assert np.array_equal(again[0].tokens, train.tokens) and np.array_equal(again[1].tokens, valid.tokens)


def test_split_tokens_never_overlaps():
    tokens = np.arange(100)
    for fraction, seq_len in ((0.01, 8), (0.3, 8), (0.5, 80), (0.9, 200)):
        train, valid = split_tokens(tokens, fraction, seq_len)
        assert np.array_equal(np.concatenate([train, valid]), tokens)
        assert len(valid) == min(100, max(seq_len, round(100 * fraction)))


def test_one_short_text_file_says_how_long_it_is(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 50, encoding="utf-8")
    cfg = DataConfig(source=str(path), tokenizer="bytes", seq_len=32, valid_fraction=0.01)
    with pytest.raises(DataSourceError, match=r"short\.txt' is one document of 50 tokens.*data\.seq_len=32"):
        build_datasets(cfg, ByteTokenizer())


# ----------------------------------------------------------------------------- files that are not text


@pytest.mark.parametrize("content, why", [(_random_bytes(4000), "is not UTF-8 text"),
                                          (b"text\x00with a NUL byte", "is not UTF-8 text"),
                                          (b"  \n\n ", "is empty")])
def test_one_bad_text_file_is_refused(tmp_path, content, why):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataSourceError, match=f"'{path}' {why}"):
        load_documents(str(path))


def test_directory_skips_files_that_are_not_text_with_one_warning(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(_random_bytes(3000))
    (tmp_path / "c.md").write_text("second document", encoding="utf-8")
    (tmp_path / "d.txt").write_text("", encoding="utf-8")
    (tmp_path / "e.py").write_bytes(_random_bytes(500, seed=1))
    (tmp_path / "image.png").write_bytes(_random_bytes(100))  # not a text suffix: ignored, not counted
    monkeypatch.delenv("RANK", raising=False)
    assert [t for _, t in load_documents(str(tmp_path))] == ["first document", "second document"]
    err = capsys.readouterr().err.splitlines()
    assert err == [f"braid: warning: data.source '{tmp_path}': skipped 3 of 5 files (2 not UTF-8 text, 1 empty; "
                   f"first: {tmp_path / 'b.txt'})"]
    monkeypatch.setenv("RANK", "1")  # every rank reads the source; only the first says so
    load_documents(str(tmp_path))
    assert capsys.readouterr().err == ""


def test_directory_with_nothing_usable_is_refused(tmp_path):
    (tmp_path / "x.txt").write_bytes(_random_bytes(1000))
    (tmp_path / "y.md").write_bytes(_random_bytes(1000, seed=1))
    with pytest.raises(DataSourceError, match=r"holds no usable documents \(2 not UTF-8 text\)"):
        load_documents(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"\x00")
    with pytest.raises(DataSourceError, match=f"'{empty}' holds no .*txt files"):
        load_documents(str(empty))


# ----------------------------------------------------------------------------- JSON lines


@pytest.mark.parametrize("lines, why", [
    ([b'{"text": "fine"}', _random_bytes(200).replace(b"\n", b" ")], "line 2 is not UTF-8 text"),
    ([b'{"text": "fine"}', b"", b"plain words"], "line 3 is not valid JSON"),
    ([b"17"], "line 1 is not a JSON object"),
    ([b'{"text": null}'], "line 1: field 'text' is null, not a string"),
    ([b'{"text": ["a"]}'], "line 1: field 'text' is an array, not a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, why):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataSourceError) as info:
        load_documents(str(path))
    assert str(info.value).startswith(f"data.source '{path}': {why}")


def test_random_bytes_jsonl_is_refused_on_its_first_line(tmp_path):
    path = tmp_path / "noise.jsonl"
    path.write_bytes(_random_bytes(4000))
    with pytest.raises(DataSourceError, match=r"noise\.jsonl': line 1 is not (UTF-8 text|valid JSON)"):
        load_documents(str(path))


def test_unreadable_parquet_names_the_file(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "noise.parquet"
    path.write_bytes(_random_bytes(2000))
    with pytest.raises(DataSourceError, match=r"noise\.parquet' could not be read as parquet: .*magic"):
        load_documents(str(path))


def test_empty_jsonl_is_refused(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match="holds no records"):
        load_documents(str(path))
    path.write_text(json.dumps({"text": "one"}) + "\n", encoding="utf-8")
    assert load_documents(str(path)) == [(f"{path}:0", "one")]
