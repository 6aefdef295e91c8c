"""Corpora, the deterministic split, tokenizers (byte and cached BPE) and the batch order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.jobs.spec import CorpusSpec
from worker.lm.corpora import load_documents, split_documents
from worker.lm.data import WindowBatches, validation_batches
from worker.lm.tokenization import ByteTokenizer, encode_documents, train_bpe

pytestmark = pytest.mark.usefixtures("data_roots")  # local paths confined to tmp_path


def test_pydoc_corpus_split_is_deterministic_and_disjoint() -> None:
    spec = CorpusSpec(name="pydoc", max_chars=300_000)
    docs = load_documents(spec)
    assert sum(map(len, docs)) <= 300_000 and len(docs) > 20
    train, val = split_documents(docs, 0.1)
    again = split_documents(load_documents(spec), 0.1)
    assert (train, val) == again
    assert train and val and not set(train) & set(val)
    # Content-hash split: the held-out set does not depend on document order.
    assert set(split_documents(list(reversed(docs)), 0.1)[1]) == set(val)


def test_stdlib_code_corpus_is_python_source() -> None:
    docs = load_documents(CorpusSpec(name="stdlib_code", max_chars=100_000))
    assert sum(map(len, docs)) == 100_000
    assert any("def " in d for d in docs)


def test_few_documents_split_inside_each(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(1000)), encoding="utf-8")
    train, val = split_documents(load_documents(CorpusSpec(name="file", path=str(path))), 0.2)
    assert len(train) == len(val) == 1
    assert train[0].endswith("\n") and val[0].startswith("line ")
    assert train[0] + val[0] == path.read_text(encoding="utf-8")
    assert 0.15 < len(val[0]) / (len(train[0]) + len(val[0])) < 0.25


def test_jsonl_and_parquet_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document number {i}" for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts), encoding="utf-8")
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        spec = CorpusSpec(name="file", path=str(tmp_path / name), text_field="body")
        assert load_documents(spec) == texts
    with pytest.raises(ValueError, match="no field 'text'"):
        load_documents(CorpusSpec(name="file", path=str(tmp_path / "d.jsonl")))


def test_hf_dataset_from_local_directory(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    texts = [f"hf text {i}" for i in range(12)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    docs = load_documents(CorpusSpec(name="hf", hf_name=str(folder), hf_split="train"))
    assert docs == texts


def test_byte_tokenizer_round_trip_and_separators() -> None:
    tok = ByteTokenizer()
    ids = encode_documents(tok, ["héllo", "ab"])
    assert ids.dtype == torch.int32
    assert ids.tolist() == [*"héllo".encode(), 256, ord("a"), ord("b"), 256]
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"


def test_bpe_trains_then_loads_from_cache(tmp_path: Path) -> None:
    docs = load_documents(CorpusSpec(name="pydoc", max_chars=60_000))
    tok = train_bpe(docs, 400, cache_dir=tmp_path)
    cached = list((tmp_path / "tokenizers").glob("bpe-*.json"))
    assert len(cached) == 1
    assert tok.vocab_size == 400
    text = "The for statement is used to iterate"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())  # merges learned
    stamp = cached[0].stat().st_mtime_ns
    again = train_bpe(docs, 400, cache_dir=tmp_path)
    assert cached[0].stat().st_mtime_ns == stamp  # loaded, not retrained
    assert again.encode(text) == tok.encode(text)
    train_bpe(docs[:-1], 400, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokenizers").glob("bpe-*.json"))) == 2  # new corpus, new entry


def test_batches_are_a_function_of_seed_and_position() -> None:
    tokens = torch.arange(1000, dtype=torch.int32)
    a, b = WindowBatches(tokens, 8, 4, seed=1), WindowBatches(tokens, 8, 4, seed=1)
    other = WindowBatches(tokens, 8, 4, seed=2)
    assert all(torch.equal(a.batch(i)[0], b.batch(i)[0]) for i in range(40))
    assert any(not torch.equal(a.batch(i)[0], other.batch(i)[0]) for i in range(5))
    # Out-of-order access (a resumed run) gives the same batch.
    assert torch.equal(WindowBatches(tokens, 8, 4, seed=1).batch(37)[0], a.batch(37)[0])
    x, y = a.batch(0)
    assert x.shape == y.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    # One epoch visits each window exactly once.
    n = a.n_windows
    seen = torch.cat([a.window_indices(i) for i in range(n // 4)])
    assert len(set(seen.tolist())) == len(seen)


def test_validation_batches_are_fixed_and_capped() -> None:
    tokens = torch.arange(500, dtype=torch.int32)
    first = validation_batches(tokens, 10, 4, max_batches=3)
    assert len(first) == 3 and all(x.shape == (4, 10) for x, _ in first)
    again = validation_batches(tokens, 10, 4, max_batches=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="validation split"):
        validation_batches(torch.arange(5, dtype=torch.int32), 10, 4, 1)
