"""Token shards: prepare-data for every source and tokenizer kind, resume and refusals, the memmap
reader against the in-memory token stream, the batch order, and bad shard folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from server.jobs.spec import CorpusSpec, TaskSpec
from worker.lm import prepare as prep
from worker.lm.corpora import _held_out, load_documents, split_documents
from worker.lm.data import WindowBatches, permute, validation_batches
from worker.lm.prepare import Source, encode_with_separator, prepare_data
from worker.lm.shards import MANIFEST, ShardError, open_shards
from worker.lm.task import build_task, cached_shards
from worker.lm.tokenization import EOT, ByteTokenizer, encode_documents, train_bpe

pytestmark = pytest.mark.usefixtures("data_roots")

DOCS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 7) for i in range(120)]


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    return path


def _split_tokens(folder: Path) -> dict[str, np.ndarray]:
    shards = open_shards(folder)
    return {
        "train": shards.train.window(0, len(shards.train)),
        "val": shards.val.window(0, len(shards.val)),
    }


def _expected(tokenizer: Any, docs: list[str], val_fraction: float) -> dict[str, np.ndarray]:
    """Independent of the pipeline: encode each document and concatenate per split, in order."""
    out: dict[str, list[int]] = {"train": [], "val": []}
    for doc in docs:
        out["val" if _held_out(doc, val_fraction) else "train"] += [*tokenizer.encode(doc), tokenizer.eos_id]
    return {k: np.array(v, dtype=np.int64) for k, v in out.items()}


def _hf_tokenizer_folder(tmp_path: Path) -> Path:
    """A pretrained-style HF tokenizer saved locally (no hub access): a BPE wrapped by transformers."""
    from transformers import PreTrainedTokenizerFast

    bpe = train_bpe(DOCS, 320, cache_dir=tmp_path / "bpe")
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tok, eos_token=EOT)
    folder = tmp_path / "hf-tok"
    fast.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["byte", "bpe", "hf"])
def test_round_trip_every_tokenizer_kind(tmp_path: Path, kind: str) -> None:
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    tokenizer_arg = str(_hf_tokenizer_folder(tmp_path)) if kind == "hf" else kind
    out = tmp_path / "shards"
    report = prepare_data(
        Source(str(source)),
        out,
        tokenizer=tokenizer_arg,
        vocab_size=400,
        val_fraction=0.1,
        shard_tokens=1500,
        processes=1,
        progress=False,
    )
    manifest = report.manifest
    assert manifest["complete"] and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["kind"] == kind and len(manifest["tokenizer"]["sha256"]) == 64
    assert sum(1 for e in manifest["shards"] if e["split"] == "train") > 2  # really sharded
    tokenizer = open_shards(out)
    from worker.lm.task import shard_tokenizer

    tok = shard_tokenizer(tokenizer)
    got, want = _split_tokens(out), _expected(tok, DOCS, 0.1)
    assert np.array_equal(got["train"], want["train"]) and np.array_equal(got["val"], want["val"])
    # Tokens back to text: every document, in order, split at the separator.
    eos = manifest["separator"]["token_id"]
    train_docs = [d for d in DOCS if not _held_out(d, 0.1)]
    pieces, start = [], 0
    for end in np.flatnonzero(got["train"] == eos):
        pieces.append(tok.decode(got["train"][start:end].tolist()))
        start = end + 1
    assert pieces == train_docs


def test_worker_processes_write_the_same_shards(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    for procs in (1, 2):
        prepare_data(
            Source(str(source)),
            tmp_path / f"p{procs}",
            val_fraction=0.1,
            shard_tokens=2000,
            processes=procs,
            progress=False,
            chunk_chars=500,
        )
    one, two = _split_tokens(tmp_path / "p1"), _split_tokens(tmp_path / "p2")
    assert all(np.array_equal(one[s], two[s]) for s in ("train", "val"))


def test_sources_glob_parquet_and_streamed_hf_folder(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_jsonl(folder / "a.jsonl", DOCS[:60])
    pq.write_table(pa.table({"text": DOCS[60:]}), folder / "b.parquet")
    prepare_data(Source(str(folder / "*")), tmp_path / "g", val_fraction=0.1, processes=1, progress=False)
    got = _split_tokens(tmp_path / "g")
    want = _expected(ByteTokenizer(), DOCS, 0.1)
    assert np.array_equal(got["train"], want["train"]) and np.array_equal(got["val"], want["val"])
    # A Hugging Face dataset folder, streamed by datasets.load_dataset(..., streaming=True).
    hf = tmp_path / "hfds"
    hf.mkdir()
    _write_jsonl(hf / "train.jsonl", DOCS)
    report = prepare_data(Source(f"hf:{hf}"), tmp_path / "h", val_fraction=0.1, processes=1, progress=False)
    assert report.manifest["source"]["kind"] == "hf"
    got = _split_tokens(tmp_path / "h")
    assert np.array_equal(got["train"], want["train"]) and np.array_equal(got["val"], want["val"])


def test_interrupted_prepare_resumes_to_the_same_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    options: dict[str, Any] = dict(val_fraction=0.1, shard_tokens=700, processes=1, progress=False)
    prepare_data(Source(str(source)), tmp_path / "clean", **options)
    real_close = prep._SplitWriter.close
    closed: list[int] = []

    def crash_after_three(self: Any, end: dict[str, int]) -> None:
        if len(closed) == 3:
            raise KeyboardInterrupt
        closed.append(1)
        real_close(self, end)

    monkeypatch.setattr(prep._SplitWriter, "close", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(Source(str(source)), tmp_path / "resumed", **options)
    monkeypatch.setattr(prep._SplitWriter, "close", real_close)
    partial = json.loads((tmp_path / "resumed" / MANIFEST).read_text())
    assert not partial["complete"] and len(partial["shards"]) == 3
    with pytest.raises(ShardError, match="unfinished"):
        open_shards(tmp_path / "resumed")
    report = prepare_data(Source(str(source)), tmp_path / "resumed", **options)
    assert (
        0 < report.new_tokens < sum(e["tokens"] for e in report.manifest["shards"])
    )  # skipped the done part
    clean = json.loads((tmp_path / "clean" / MANIFEST).read_text())
    assert [e["tokens"] for e in report.manifest["shards"]] == [e["tokens"] for e in clean["shards"]]
    for entry in clean["shards"]:
        assert (tmp_path / "clean" / entry["file"]).read_bytes() == (
            tmp_path / "resumed" / entry["file"]
        ).read_bytes()
    # A finished folder is left alone; a damaged one is refused.
    assert prepare_data(Source(str(source)), tmp_path / "resumed", **options).new_tokens == 0
    first = tmp_path / "resumed" / clean["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(ShardError, match="bytes but the manifest says"):
        prepare_data(Source(str(source)), tmp_path / "resumed", **options)


def test_prepare_refuses_a_folder_of_another_tokenizer_or_source(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepare_data(Source(str(source)), tmp_path / "s", val_fraction=0.1, processes=1, progress=False)
    with pytest.raises(ShardError, match="another tokenizer"):
        prepare_data(
            Source(str(source)),
            tmp_path / "s",
            tokenizer="bpe",
            vocab_size=400,
            val_fraction=0.1,
            processes=1,
            progress=False,
        )
    with pytest.raises(ShardError, match="another source"):
        prepare_data(Source("pydoc"), tmp_path / "s", val_fraction=0.1, processes=1, progress=False)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x.bin").write_bytes(b"\0\0")
    with pytest.raises(ShardError, match=r"no manifest\.json"):
        prepare_data(Source(str(source)), stray, processes=1, progress=False)
    # The command line reports the refusal in one line and exits 2.
    from worker.cli import app

    result = CliRunner().invoke(
        app, ["prepare-data", str(source), "--out", str(tmp_path / "s"), "--tokenizer", "bpe", "--quiet"]
    )
    assert result.exit_code == 2 and "another tokenizer" in result.output
    ok = CliRunner().invoke(
        app,
        [
            "prepare-data",
            str(source),
            "--out",
            str(tmp_path / "c"),
            "--quiet",
            "--processes",
            "1",
            "--val-fraction",
            "0.1",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "training tokens" in ok.output and (tmp_path / "c" / MANIFEST).is_file()


def test_memmap_batches_equal_the_in_memory_stream(tmp_path: Path) -> None:
    docs = load_documents(CorpusSpec(name="pydoc", max_chars=200_000))
    train_docs, val_docs = split_documents(docs, 0.1)
    tok = ByteTokenizer()
    shards = cached_shards(tok, train_docs, val_docs, {"kind": "test"})
    assert isinstance(shards.train.parts[0], np.memmap)
    in_memory_train = encode_documents(tok, train_docs)
    in_memory_val = encode_documents(tok, val_docs)
    on_disk, in_memory = (
        WindowBatches(shards.train, 32, 8, seed=3),
        WindowBatches(in_memory_train, 32, 8, seed=3),
    )
    for index in (0, 1, 17, 500, 5000):
        for a, b in zip(on_disk.batch(index), in_memory.batch(index), strict=True):
            assert torch.equal(a, b)
    # The window numbers mean the same tokens as slicing the in-memory stream directly.
    windows = on_disk.window_indices(9)
    x, y = on_disk.batch(9)
    for row, w in enumerate(windows.tolist()):
        assert torch.equal(x[row], in_memory_train[w * 32 : w * 32 + 32].long())
        assert torch.equal(y[row], in_memory_train[w * 32 + 1 : w * 32 + 33].long())
    val_disk, val_mem = validation_batches(shards.val, 32, 8, 4), validation_batches(in_memory_val, 32, 8, 4)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(val_disk, val_mem, strict=True)
    )
    # Cached by content: the same documents map to the same folder, different ones to another.
    assert cached_shards(tok, train_docs, val_docs, {"kind": "test"}).folder == shards.folder
    assert cached_shards(tok, train_docs[1:], val_docs, {"kind": "test"}).folder != shards.folder


def test_windows_cross_shard_borders(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepare_data(
        Source(str(source)), tmp_path / "s", val_fraction=0.1, shard_tokens=1000, processes=1, progress=False
    )
    shards = open_shards(tmp_path / "s")
    whole = np.concatenate([np.asarray(p) for p in shards.train.parts]).astype(np.int64)
    for start in (0, 990, 1999, 2500, len(whole) - 100):
        assert np.array_equal(shards.train.window(start, 100), whole[start : start + 100])


def test_batch_order_is_a_keyed_permutation_without_a_table() -> None:
    for n in (1, 2, 5, 64, 1000, 4097):
        for epoch in (0, 1):
            perm = permute(np.arange(n), n, seed=7, epoch=epoch)
            assert sorted(perm.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(100), 100, 7, 0), permute(np.arange(100), 100, 7, 1))
    assert not np.array_equal(permute(np.arange(100), 100, 7, 0), permute(np.arange(100), 100, 8, 0))
    # A billion windows: any position's window without building a permutation of that size.
    huge = permute(np.array([0, 123_456_789, 999_999_999]), 1_000_000_000, seed=1, epoch=3)
    assert ((huge >= 0) & (huge < 1_000_000_000)).all() and len(set(huge.tolist())) == 3


def _shard_task(folder: Path, **overrides: Any) -> TaskSpec:
    task = {
        "n_layer": 1,
        "n_head": 2,
        "d_model": 32,
        "context": 16,
        "batch_size": 4,
        "steps": 4,
        "warmup_steps": 1,
        "corpus": {"name": "shards", "path": str(folder)},
    }
    task.update(overrides)
    return TaskSpec.model_validate(task)


def test_bad_shard_folders_fail_before_training(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    folder = tmp_path / "s"
    prepare_data(
        Source(str(source)), folder, val_fraction=0.1, shard_tokens=2000, processes=1, progress=False
    )
    task = build_task(_shard_task(folder), seed=0)
    assert task.info["vocab_size"] == 257 and task.info["train_tokens"] > 0
    with pytest.raises(ShardError, match="model's vocabulary has 100"):
        build_task(_shard_task(folder, vocab_size=100), seed=0)
    with pytest.raises(ShardError, match="too few for one window"):
        build_task(_shard_task(folder, context=4096), seed=0)
    with pytest.raises(ShardError, match="does not exist"):
        build_task(_shard_task(tmp_path / "nowhere"), seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardError, match=r"has no manifest\.json"):
        build_task(_shard_task(empty), seed=0)
    manifest = json.loads((folder / MANIFEST).read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        open_shards(broken)
    (folder / manifest["shards"][1]["file"]).write_bytes(b"\0" * 10)
    with pytest.raises(ShardError, match="bytes but the manifest says"):
        open_shards(folder)


def test_separator_and_dtype_for_large_vocabularies() -> None:
    class Big:
        vocab_size, eos_id = 100_000, 99_999

        def encode(self, text: str) -> list[int]:
            return [70_000 + len(text)]

    (ids,) = encode_with_separator(Big(), ["abc"], prep.dtype_for_vocab(Big.vocab_size))  # type: ignore[arg-type]
    assert ids.dtype == np.uint32 and ids.tolist() == [70_003, 99_999]


class _CrashAt:
    """A sink whose worker 'dies' when step ``step`` is logged."""

    def __init__(self, step: int) -> None:
        from worker.training.sinks import MemorySink

        self.inner, self.step = MemorySink(), step

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def log_metrics(self, step: int, metrics: Any, wall_time: float) -> None:
        if step == self.step:
            raise RuntimeError("simulated worker crash")
        self.inner.log_metrics(step, metrics, wall_time)


def test_resumed_run_on_prepared_shards_is_exact(tmp_path: Path) -> None:
    from server.jobs.spec import parse_job
    from worker.training.runner import execute_run
    from worker.training.sinks import MemorySink

    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepare_data(
        Source(str(source)), tmp_path / "s", val_fraction=0.1, shard_tokens=1000, processes=1, progress=False
    )
    job = {
        "name": "shards",
        "device": "cpu",
        "optimizers": [{"name": "adamw", "hyperparameters": {"lr": 3e-3}}],
        "task": {
            **_shard_task(tmp_path / "s").model_dump(),
            "arch": "llama",
            "steps": 8,
            "eval_every": 4,
            "checkpoint_every": 3,
            "fisher_every": 0,
            "log_every": 1,
            "dropout": 0.1,
        },
    }
    (spec,) = parse_job(job).expand()
    full = MemorySink()
    assert execute_run(spec, full, checkpoint_dir=tmp_path / "full").status == "succeeded"
    crashed = execute_run(spec, _CrashAt(5), checkpoint_dir=tmp_path / "resumed")  # type: ignore[arg-type]
    assert crashed.status == "failed"
    resumed = MemorySink()
    result = execute_run(spec, resumed, checkpoint_dir=tmp_path / "resumed")
    assert result.status == "succeeded" and next(s for s, _, _ in resumed.records) == 4
    reference = dict(full.series("train_loss"))
    assert all(reference[step] == loss for step, loss in resumed.series("train_loss"))
    assert result.summary["final_val_loss"] == full.series("val_loss")[-1][1]
