"""Data: tokenizers, sources, packing into sequences, the sample order, sharding and resuming."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from braid.config import DataConfig
from braid.data.loader import SampleOrder, micro_batches, rank_sample_ids
from braid.data.packing import PackedSequences, build_datasets, split_documents
from braid.data.sources import embedded_corpus, load_documents
from braid.data.tokenizer import ByteTokenizer, load_tokenizer
from braid.errors import ConfigError, DataSourceError

EOS = 256
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- byte tokenizer


@pytest.mark.parametrize("text", ["hello, world\n", "naïve café — 日本語 🙂", ""])
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    (ids,) = tok.encode_batch([text])
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.max(initial=0) < 256 and tok.eos_id == 256 and tok.vocab_size == 257
    assert tok.decode(ids.tolist()) == text


def test_byte_tokenizer_decode_drops_eos():
    tok = ByteTokenizer()
    (ids,) = tok.encode_batch(["ab"])
    assert tok.decode(list(ids) + [tok.eos_id]) == "ab"


# ----------------------------------------------------------------------------- packing


def random_docs(seed=0, n=15, max_len=23):
    """Documents of random lengths (including an empty and a one-token one), tokens < 200 (no EOS)."""
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(2, max_len, size=n))
    lengths[3], lengths[7] = 0, 1
    return [rng.integers(0, 200, size=k).astype(np.int32) for k in lengths]


def reference_stream(docs):
    """The expected packed stream with per-token document index and position within its document."""
    tokens, doc_index, positions = [], [], []
    for i, d in enumerate(docs):
        tokens += list(d) + [EOS]
        doc_index += [i] * (len(d) + 1)
        positions += list(range(len(d) + 1))
    return np.array(tokens), np.array(doc_index), np.array(positions)


@pytest.fixture(scope="module")
def docs():
    return random_docs()


@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_packed_samples_tile_the_stream(docs, seq_len):
    """Inputs of consecutive samples tile the stream: no token lost or repeated; EOS after each doc."""
    ds = PackedSequences(docs, EOS, seq_len, reset_position_ids=False)
    stream, _, _ = reference_stream(docs)
    assert len(ds) == (len(stream) - 1) // seq_len
    inputs = np.concatenate([ds[i]["input_ids"] for i in range(len(ds))])
    assert np.array_equal(inputs, stream[: len(ds) * seq_len])


def test_packed_labels_are_inputs_shifted(docs):
    ds = PackedSequences(docs, EOS, 16, reset_position_ids=False)
    stream, _, _ = reference_stream(docs)
    for i in range(len(ds)):
        s = ds[i]
        assert np.array_equal(s["labels"][:-1], s["input_ids"][1:])
        assert s["labels"][-1] == stream[(i + 1) * 16]  # the next sample's first input
        if i + 1 < len(ds):
            assert s["labels"][-1] == ds[i + 1]["input_ids"][0]


def test_packed_sample_dtypes_and_shapes(docs):
    s = PackedSequences(docs, EOS, 16, reset_position_ids=True)[0]
    assert set(s) == {"input_ids", "labels", "doc_ids", "position_ids"}
    for v in s.values():
        assert v.shape == (16,) and v.dtype == np.int64


def test_packed_doc_ids(docs):
    """doc_ids start at 0 in each sample and step up by one at the token after each EOS."""
    ds = PackedSequences(docs, EOS, 16, reset_position_ids=False)
    _, doc_index, _ = reference_stream(docs)
    for i in range(len(ds)):
        s = ds[i]
        assert s["doc_ids"][0] == 0
        steps = np.diff(s["doc_ids"])
        assert np.array_equal(steps, (s["input_ids"][:-1] == EOS).astype(np.int64))
        expected = doc_index[i * 16 : (i + 1) * 16]
        assert np.array_equal(s["doc_ids"], expected - expected[0])


def test_packed_position_ids_reset_per_document(docs):
    ds = PackedSequences(docs, EOS, 16, reset_position_ids=True)
    _, _, positions = reference_stream(docs)
    for i in range(len(ds)):
        s = ds[i]
        assert np.array_equal(s["position_ids"], positions[i * 16 : (i + 1) * 16])
        after_eos = np.flatnonzero(s["input_ids"][:-1] == EOS) + 1
        assert np.all(s["position_ids"][after_eos] == 0)


def test_packed_position_ids_plain(docs):
    ds = PackedSequences(docs, EOS, 16, reset_position_ids=False)
    for i in range(len(ds)):
        assert np.array_equal(ds[i]["position_ids"], np.arange(16))


def test_packed_index_out_of_range(docs):
    ds = PackedSequences(docs, EOS, 16, reset_position_ids=False)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_packed_large_token_ids_kept():
    """Token ids beyond uint16 survive packing."""
    docs = [np.array([70000, 5, 123456], dtype=np.int32), np.array([1, 2], dtype=np.int32)]
    ds = PackedSequences(docs, 99999, 2, reset_position_ids=False)
    inputs = np.concatenate([ds[i]["input_ids"] for i in range(len(ds))])
    assert np.array_equal(inputs, [70000, 5, 123456, 99999, 1, 2])


# ----------------------------------------------------------------------------- document split


@pytest.mark.parametrize("n", [2, 3, 10, 101, 1000])
@pytest.mark.parametrize("valid_fraction", [0.01, 0.1, 0.5, 0.9])
def test_split_documents(n, valid_fraction):
    train, valid = split_documents(n, valid_fraction)
    assert len(valid) >= 1 and len(train) >= 1
    assert not set(train) & set(valid)
    assert sorted(train + valid) == list(range(n))
    assert (train, valid) == split_documents(n, valid_fraction)


def test_split_documents_roughly_honours_fraction():
    _, valid = split_documents(1000, 0.1)
    assert 80 <= len(valid) <= 120


def test_split_documents_needs_two():
    with pytest.raises(DataSourceError):
        split_documents(1, 0.1)


# ----------------------------------------------------------------------------- sample order


def test_sample_order_deterministic_per_seed():
    a, b, c = SampleOrder(50, seed=7), SampleOrder(50, seed=7), SampleOrder(50, seed=8)
    seq_a = [a(g) for g in range(150)]
    assert seq_a == [b(g) for g in range(150)]
    assert seq_a != [c(g) for g in range(150)]


def test_sample_order_epochs_are_distinct_permutations():
    n = 50
    order = SampleOrder(n, seed=3)
    epochs = [[order(e * n + i) for i in range(n)] for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))


def test_sample_order_random_access_matches_sequential():
    seq = [SampleOrder(20, seed=1)(g) for g in range(60)]
    rand = SampleOrder(20, seed=1)
    for g in (45, 3, 27, 59, 0):
        assert rand(g) == seq[g]


def test_sample_order_no_shuffle_is_identity():
    order = SampleOrder(10, seed=5, shuffle=False)
    assert [order(g) for g in range(30)] == list(range(10)) * 3


# ----------------------------------------------------------------------------- sharding and resuming

SEQ = 8
GB = 8
MICRO = 2


@pytest.fixture(scope="module")
def dataset():
    ds = PackedSequences(random_docs(seed=1, n=40, max_len=20), EOS, SEQ, reset_position_ids=True)
    assert len(ds) >= 30
    return ds


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_rank_sample_ids_cover_global_batch_once(dp):
    for step in range(7):
        start = step * GB
        ids = [g for r in range(dp) for g in rank_sample_ids(start, GB, r, dp)]
        assert sorted(ids) == list(range(start, start + GB))
        assert all(len(rank_sample_ids(start, GB, r, dp)) == GB // dp for r in range(dp))


def _rows(batches):
    return [tuple(row.tolist()) for b in batches for row in b["input_ids"]]


def test_micro_batches_same_samples_for_any_dp(dataset):
    """Over all ranks, each step holds exactly the samples of the global batch, whatever dp is."""
    per_step = {}
    for dp in (1, 2, 4):
        order = SampleOrder(len(dataset), seed=11)
        for step in range(6):  # crosses an epoch boundary
            start = step * GB
            rows = []
            for rank in range(dp):
                rows += _rows(micro_batches(dataset, order, start, GB, MICRO, rank, dp, CPU))
            expected = [tuple(dataset[order(g)]["input_ids"].tolist()) for g in range(start, start + GB)]
            assert Counter(rows) == Counter(expected), f"dp={dp} step={step}"
            per_step.setdefault(step, Counter(rows))
            assert Counter(rows) == per_step[step], f"dp={dp} step={step} differs from dp=1"


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_micro_batches_shapes(dataset, dp):
    order = SampleOrder(len(dataset), seed=0)
    batches = micro_batches(dataset, order, 0, GB, MICRO, dp - 1, dp, CPU, with_doc_ids=False)
    assert len(batches) == GB // (MICRO * dp)
    for b in batches:
        assert "doc_ids" not in b
        assert set(b) == {"input_ids", "labels", "position_ids"}
        for v in b.values():
            assert v.shape == (MICRO, SEQ) and v.dtype == torch.int64


def test_micro_batches_with_doc_ids(dataset):
    order = SampleOrder(len(dataset), seed=0)
    (b, *_) = micro_batches(dataset, order, 0, GB, MICRO, 0, 1, CPU, with_doc_ids=True)
    assert b["doc_ids"].shape == (MICRO, SEQ) and b["doc_ids"].dtype == torch.int64
    g0 = dataset[order(0)]
    assert torch.equal(b["doc_ids"][0], torch.from_numpy(g0["doc_ids"]))
    assert torch.equal(b["labels"][0], torch.from_numpy(g0["labels"]))


def test_resume_equals_continuous(dataset):
    continuous_order = SampleOrder(len(dataset), seed=5)
    continuous = [micro_batches(dataset, continuous_order, s * GB, GB, MICRO, 0, 1, CPU) for s in range(8)]
    for k in (1, 3, 6):
        resumed_order = SampleOrder(len(dataset), seed=5)  # fresh object, as after a restart
        for s in range(k, 8):
            resumed = micro_batches(dataset, resumed_order, s * GB, GB, MICRO, 0, 1, CPU)
            assert len(resumed) == len(continuous[s])
            for a, b in zip(resumed, continuous[s]):
                assert a.keys() == b.keys()
                assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_on_different_dp_sees_same_samples(dataset):
    order = SampleOrder(len(dataset), seed=5)
    step = 4
    one_rank = Counter(_rows(micro_batches(dataset, order, step * GB, GB, MICRO, 0, 1, CPU)))
    four_ranks = Counter()
    for rank in range(4):
        four_ranks += Counter(_rows(micro_batches(dataset, SampleOrder(len(dataset), seed=5),
                                                  step * GB, GB, MICRO, rank, 4, CPU)))
    assert one_rank == four_ranks


# ----------------------------------------------------------------------------- sources


def test_local_dir_one_document_per_text_file(tmp_path):
    texts = {"b.txt": "second file", "a.txt": "first file\nwith two lines", "sub/c.txt": "nested ✓"}
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    docs = load_documents(str(tmp_path))
    assert [text for _, text in docs] == [texts["a.txt"], texts["b.txt"], texts["sub/c.txt"]]
    assert all(name.endswith(suffix) for (name, _), suffix in zip(docs, ["a.txt", "b.txt", "c.txt"]))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"text": "one", "id": 1}, {"text": "twö", "id": 2}, {"text": "three", "id": 3}])
    assert [t for _, t in load_documents(str(path))] == ["one", "twö", "three"]


def test_jsonl_custom_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"content": "alpha"}, {"content": "beta"}])
    assert [t for _, t in load_documents(str(path), text_field="content")] == ["alpha", "beta"]


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    _write_jsonl(path, [{"text": "fine"}, {"body": "no text here"}, {"text": "fine"}])
    with pytest.raises(DataSourceError) as info:
        load_documents(str(path))
    message = str(info.value)
    assert "broken.jsonl" in message and "line 2" in message and "text" in message


def test_jsonl_invalid_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataSourceError, match="line 2"):
        load_documents(str(path))


def test_parquet_via_datasets(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    texts = ["first parquet doc", "second — ünïcode", "third"]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": texts, "n": [1, 2, 3]}), path)
    assert [t for _, t in load_documents(str(path))] == texts


def test_missing_local_path_raises():
    with pytest.raises(DataSourceError, match="nope.txt"):
        load_documents("./nope.txt")


def test_embedded_corpus():
    first = embedded_corpus()
    assert len(first) > 10
    names = [name for name, _ in first]
    assert names == sorted(names)
    assert all(text for _, text in first[:50])
    assert first == embedded_corpus()


# ----------------------------------------------------------------------------- HF tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world", "hello there", "the world is wide", "wide world"] * 5, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tok")
    wrapped.save_pretrained(str(path))
    return path, tok.token_to_id("</s>")


def test_hf_tokenizer_encode_decode(hf_tokenizer_dir):
    path, eos = hf_tokenizer_dir
    tok = load_tokenizer(str(path))
    assert tok.eos_id == eos
    assert tok.vocab_size >= 258
    texts = ["hello world", "a wide world, hello"]
    encoded = tok.encode_batch(texts)
    assert all(ids.dtype == np.int32 and len(ids) > 0 for ids in encoded)
    assert len(encoded[0]) < len(texts[0])  # merges were learned
    assert [tok.decode(ids.tolist()) for ids in encoded] == texts
    assert eos not in encoded[0]  # no special tokens added


def test_hf_tokenizer_from_tokenizer_json_file(hf_tokenizer_dir):
    path, eos = hf_tokenizer_dir
    tok = load_tokenizer(str(path / "tokenizer.json"))
    assert tok.eos_id == eos


def test_tokenizer_dir_without_files_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- build_datasets


def test_build_datasets_local_source(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    for i in range(8):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=30)), encoding="utf-8")
    cfg = DataConfig(source=str(tmp_path), tokenizer="bytes", seq_len=16, valid_fraction=0.25)
    train, valid = build_datasets(cfg, ByteTokenizer())
    assert len(train) > 0 and len(valid) > 0
    assert train.n_documents + valid.n_documents == 8
    assert train[0]["input_ids"].shape == (16,) and valid[0]["input_ids"].shape == (16,)


def test_build_datasets_too_short_raises(tmp_path):
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text("tiny", encoding="utf-8")
    cfg = DataConfig(source=str(tmp_path), tokenizer="bytes", seq_len=64, valid_fraction=0.25)
    with pytest.raises(DataSourceError):
        build_datasets(cfg, ByteTokenizer())
