"""``dykaf-lab prepare-data``: turn a corpus into token shards (see ``worker.lm.shards`` for the format).

The source is read as a stream of documents, in a fixed order, never whole: the embedded corpora,
local text/JSONL/Parquet files (a file, a folder or a glob), or a Hugging Face dataset streamed with
``datasets.load_dataset(..., streaming=True)``. Documents are held out for validation by a hash of
their content (the same rule as the in-memory split), tokenised in chunks by a pool of worker
processes (``imap`` keeps the order, so the shards do not depend on the number of processes) and
written by the main process into shards of a fixed token count.

Resuming: every finished shard is renamed into place and then recorded in the manifest together with
the source position where it ends (document number, tokens of that document already written). A
re-run checks the recorded shards' sizes, skips the source up to the earliest of those positions
without tokenising it, and drops what the shards already hold. The tokenizer and the settings are part
of the manifest; a folder made with anything else is refused rather than mixed.
"""

from __future__ import annotations

import glob
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.jobs.paths import cache_root
from worker.lm.corpora import (
    _file_format,
    _held_out,
    _read_one_file,
    pydoc_documents,
    read_files,
    stdlib_code_documents,
)
from worker.lm.shards import (
    FORMAT,
    MANIFEST,
    SPLITS,
    TOKENIZER_FILE,
    ShardError,
    check_shard_file,
    dtype_for_vocab,
    read_manifest,
    shard_name,
    write_json_atomic,
)
from worker.lm.tokenization import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    TextTokenizer,
    tokenizer_identity,
    train_bpe,
)

EMBEDDED = ("pydoc", "stdlib_code")
DEFAULT_SHARD_TOKENS = 100_000_000
_CHUNK_CHARS = 1_000_000  # text handed to a worker process at a time


# -- sources -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where documents come from: ``pydoc``, ``stdlib_code``, local files, or ``hf:NAME``."""

    spec: str
    format: str = "auto"
    text_field: str = "text"
    hf_config: str | None = None
    hf_split: str = "train"

    def identity(self) -> dict[str, Any]:
        """Recorded in the manifest; a resumed run must read the same source."""
        if self.spec in EMBEDDED:
            return {"kind": "embedded", "name": self.spec}
        if self.spec.startswith("hf:"):
            return {
                "kind": "hf",
                "name": self.spec[3:],
                "config": self.hf_config,
                "split": self.hf_split,
                "text_field": self.text_field,
            }
        return {"kind": "files", "pattern": self.spec, "format": self.format, "text_field": self.text_field}

    def documents(self) -> Iterator[str]:
        if self.spec == "pydoc":
            yield from pydoc_documents()
        elif self.spec == "stdlib_code":
            yield from stdlib_code_documents()
        elif self.spec.startswith("hf:"):
            yield from _hf_stream(self.spec[3:], self.hf_config, self.hf_split, self.text_field)
        else:
            yield from _files_stream(self.spec, self.format, self.text_field)


def _files_stream(pattern: str, fmt: str, text_field: str) -> Iterator[str]:
    """A file, a folder (every readable file below it) or a glob (``**`` allowed), sorted by path."""
    if any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        for file in files:
            yield from _read_one_file(file, _file_format(file, fmt), text_field)
        return
    root = Path(pattern).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"source {pattern!r} is neither an embedded corpus, a file, a folder nor a glob"
        )
    # The operator's own command: paths are not confined to the data roots here.
    yield from read_files(root.resolve(), fmt, text_field)


def _hf_stream(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    """A Hugging Face dataset (hub id or local folder), streamed record by record."""
    import datasets

    dataset = datasets.load_dataset(
        name, config, split=split, streaming=True, cache_dir=str(cache_root() / "hf-datasets")
    )
    for record in dataset:
        if text_field not in record:
            raise ValueError(f"dataset {name!r} has no column {text_field!r}; columns: {sorted(record)}")
        value = record[text_field]
        if value:
            yield str(value)


# -- tokenizers --------------------------------------------------------------------------------
def _tokenizer_recipe(tokenizer: TextTokenizer) -> dict[str, Any]:
    """A picklable way for a worker process to rebuild the same tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte"}
    if isinstance(tokenizer, BPETokenizer):
        return {"kind": "bpe", "json": tokenizer.to_dict()["json"]}
    return {"kind": "hf", "source": tokenizer.to_dict()["name_or_path"]}


def _rebuild(recipe: dict[str, Any]) -> TextTokenizer:
    if recipe["kind"] == "byte":
        return ByteTokenizer()
    if recipe["kind"] == "bpe":
        return BPETokenizer.from_json(recipe["json"])
    return load_hf_tokenizer(recipe["source"])


def load_hf_tokenizer(source: str) -> HFTokenizer:
    """A pretrained tokenizer by local folder or hub id (e.g. ``gpt2``, ``meta-llama/Llama-2-7b-hf``)."""
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(source))


def tokenizer_request(kind: str, vocab_size: int) -> dict[str, Any]:
    """What the user asked for (a trained BPE's hash is only known after training)."""
    if kind == "byte":
        return {"kind": "byte"}
    if kind == "bpe":
        return {"kind": "bpe", "vocab_size": vocab_size}
    return {"kind": "hf", "source": kind}


# -- encoding in worker processes ----------------------------------------------------------------
_WORKER_TOKENIZER: TextTokenizer | None = None


def _init_worker(recipe: dict[str, Any], pooled: bool = False) -> None:
    global _WORKER_TOKENIZER
    if pooled:
        # One thread per process: the pool already uses every core, the Rust tokenizer's own
        # threads would only oversubscribe them.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = _rebuild(recipe)


def encode_with_separator(tokenizer: TextTokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Each text's ids followed by the end-of-text id, in the shard dtype."""
    if isinstance(tokenizer, ByteTokenizer):
        out = []
        for text in texts:
            ids = np.empty(len(text.encode("utf-8")) + 1, dtype=dtype)
            ids[:-1] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            ids[-1] = tokenizer.eos_id
            out.append(ids)
        return out
    batch = getattr(tokenizer, "encode_batch", None)
    encoded = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    return [np.array([*ids, tokenizer.eos_id], dtype=dtype) for ids in encoded]


def _encode_chunk(job: tuple[list[tuple[int, str]], float, str]) -> list[tuple[int, bool, np.ndarray, int]]:
    """(document number, held out?, ids with separator, UTF-8 bytes) for each document of a chunk."""
    chunk, val_fraction, dtype = job
    assert _WORKER_TOKENIZER is not None
    arrays = encode_with_separator(_WORKER_TOKENIZER, [text for _, text in chunk], np.dtype(dtype))
    return [
        (index, _held_out(text, val_fraction), ids, len(text.encode("utf-8")))
        for (index, text), ids in zip(chunk, arrays, strict=True)
    ]


def _chunks(documents: Iterator[tuple[int, str]], chunk_chars: int) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    size = 0
    for item in documents:
        chunk.append(item)
        size += len(item[1])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# -- writing -----------------------------------------------------------------------------------
class _SplitWriter:
    """Fills fixed-size shards of one split; resumes after ``end`` = (document, offset)."""

    def __init__(
        self,
        folder: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        next_index: int,
        end: dict[str, int],
        on_shard: Callable[[dict[str, Any]], None],
    ) -> None:
        self.folder, self.split, self.dtype = folder, split, dtype
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.index = next_index
        self.resume_doc, self.resume_offset = end["doc"], end["offset"]
        self.on_shard = on_shard

    def add(self, doc: int, ids: np.ndarray) -> int:
        """Append document ``doc``'s ids (minus what finished shards hold); returns tokens taken."""
        if doc < self.resume_doc:
            return 0
        pos = self.resume_offset if doc == self.resume_doc else 0
        taken = len(ids) - pos
        while pos < len(ids):
            take = min(len(self.buffer) - self.fill, len(ids) - pos)
            self.buffer[self.fill : self.fill + take] = ids[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buffer):
                end = {"doc": doc, "offset": pos} if pos < len(ids) else {"doc": doc + 1, "offset": 0}
                self.close(end)
        return taken

    def close(self, end: dict[str, int]) -> None:
        """Write the buffer as the next shard (tmp file, then rename) and report it."""
        name = shard_name(self.split, self.index)
        tmp = self.folder / f"{name}.tmp"
        data = self.buffer[: self.fill]
        with tmp.open("wb") as handle:
            handle.write(data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.folder / name)
        self.on_shard(
            {
                "file": name,
                "split": self.split,
                "tokens": int(self.fill),
                "max_token": int(data.max()) if self.fill else -1,
                "end": end,
            }
        )
        self.index += 1
        self.fill = 0


@dataclass
class PrepareReport:
    folder: Path
    manifest: dict[str, Any]
    new_tokens: int
    seconds: float
    bytes_read: int


def _check_existing(
    folder: Path, request: dict[str, Any], source: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any] | None:
    """The manifest of an earlier run of the same command, or None for an empty folder; refuses any
    folder holding shards of another tokenizer, source or settings."""
    if not folder.exists():
        return None
    if not (folder / MANIFEST).exists():
        if any(folder.glob("*.bin")):
            raise ShardError(
                f"{str(folder)!r} holds .bin files but no {MANIFEST}; choose an empty folder for the shards"
            )
        return None
    manifest = read_manifest(folder)
    recorded = manifest["tokenizer"].get("request")
    if recorded != request:
        raise ShardError(
            f"{str(folder)!r} already holds shards of another tokenizer "
            f"({manifest['tokenizer'].get('name')}, {recorded}), not {request}; "
            "use another --out folder or delete this one"
        )
    if manifest.get("source") != source:
        raise ShardError(
            f"{str(folder)!r} holds shards of another source ({manifest.get('source')}), not {source}; "
            "use another --out folder"
        )
    if manifest.get("settings") != settings:
        raise ShardError(
            f"{str(folder)!r} was prepared with other settings ({manifest.get('settings')}), not {settings}; "
            "use the same options or another --out folder"
        )
    dtype = np.dtype(manifest["dtype"])
    for entry in manifest["shards"]:
        check_shard_file(folder, entry, dtype)
    return manifest


def _build_tokenizer(
    kind: str, vocab_size: int, folder: Path, source: Source, val_fraction: float, sample_chars: int
) -> TextTokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        saved = folder / TOKENIZER_FILE
        if saved.is_file():
            return BPETokenizer.from_json(saved.read_text(encoding="utf-8"))
        sample, size = [], 0
        for doc in source.documents():
            if _held_out(doc, val_fraction):
                continue
            sample.append(doc[: sample_chars - size])
            size += len(sample[-1])
            if size >= sample_chars:
                break
        if not sample:
            raise ValueError("the source has no training documents to train a BPE on")
        tokenizer = train_bpe(sample, vocab_size)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TOKENIZER_FILE).write_text(tokenizer.to_dict()["json"], encoding="utf-8")
        return tokenizer
    return load_hf_tokenizer(kind)


def prepare_data(
    source: Source,
    out: str | os.PathLike[str],
    *,
    tokenizer: str = "byte",
    vocab_size: int = 32_768,
    bpe_sample_chars: int = 20_000_000,
    val_fraction: float = 0.005,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    processes: int | None = None,
    max_documents: int | None = None,
    progress: bool = True,
    chunk_chars: int = _CHUNK_CHARS,
) -> PrepareReport:
    """Tokenise ``source`` into shards under ``out`` (resuming an earlier run of the same command).

    ``tokenizer`` is ``byte``, ``bpe`` (trained on up to ``bpe_sample_chars`` of training text) or a
    pretrained Hugging Face tokenizer's local folder or hub id.
    """
    folder = Path(out)
    request = tokenizer_request(tokenizer, vocab_size)
    settings = {"shard_tokens": shard_tokens, "val_fraction": val_fraction, "max_documents": max_documents}
    existing = _check_existing(folder, request, source.identity(), settings)
    if existing is not None and existing.get("complete"):
        return PrepareReport(folder, existing, 0, 0.0, 0)
    tok = _build_tokenizer(tokenizer, vocab_size, folder, source, val_fraction, bpe_sample_chars)
    identity = {**tokenizer_identity(tok), "request": request}
    if existing is not None and existing["tokenizer"]["sha256"] != identity["sha256"]:
        raise ShardError(f"{str(folder)!r} holds shards of a tokenizer with another hash; use another --out")
    dtype = dtype_for_vocab(tok.vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tmp"):
        stale.unlink()
    manifest = existing or {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer": identity,
        "separator": {"token_id": tok.eos_id, "placement": "after every document"},
        "source": source.identity(),
        "settings": settings,
        "shards": [],
        "complete": False,
    }

    def record(entry: dict[str, Any]) -> None:
        manifest["shards"].append(entry)
        write_json_atomic(folder / MANIFEST, manifest)

    writers = {}
    for split in SPLITS:
        done = [e for e in manifest["shards"] if e["split"] == split]
        end = done[-1]["end"] if done else {"doc": 0, "offset": 0}
        writers[split] = _SplitWriter(folder, split, dtype, shard_tokens, len(done), end, record)
    write_json_atomic(folder / MANIFEST, manifest)
    start_doc = min(w.resume_doc for w in writers.values())
    documents = itertools.islice(enumerate(source.documents()), start_doc, max_documents)
    jobs = ((chunk, val_fraction, dtype.name) for chunk in _chunks(documents, chunk_chars))
    n_proc = processes or os.cpu_count() or 1
    from tqdm import tqdm

    began = time.perf_counter()
    new_tokens, n_docs, text_bytes = 0, start_doc, 0
    bar = tqdm(desc=f"tokenising ({n_proc} proc)", unit="tok", unit_scale=True, disable=not progress)
    recipe = _tokenizer_recipe(tok)
    pool = (
        multiprocessing.get_context("spawn").Pool(n_proc, _init_worker, (recipe, True))
        if n_proc > 1
        else None
    )
    try:
        if pool is None:
            _init_worker(recipe)
        results = pool.imap(_encode_chunk, jobs) if pool is not None else map(_encode_chunk, jobs)
        for encoded in results:
            for index, is_val, ids, size in encoded:
                taken = writers["val" if is_val else "train"].add(index, ids)
                new_tokens += taken
                n_docs = index + 1
                text_bytes += size
                bar.update(taken)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    for split, writer in writers.items():
        if writer.fill or not any(e["split"] == split for e in manifest["shards"]):
            writer.close({"doc": n_docs, "offset": 0})
    manifest["complete"] = True
    manifest["documents"] = n_docs
    for split in SPLITS:
        manifest[f"{split}_tokens"] = sum(e["tokens"] for e in manifest["shards"] if e["split"] == split)
    if not manifest["val_tokens"]:
        raise ShardError(
            "no document was held out for validation (the source has too few documents); raise "
            "--val-fraction or split the text into more documents"
        )
    write_json_atomic(folder / MANIFEST, manifest)
    return PrepareReport(folder, manifest, new_tokens, time.perf_counter() - began, text_bytes)


def write_document_shards(
    folder: Path, tokenizer: TextTokenizer, train_docs: list[str], val_docs: list[str], source: dict[str, Any]
) -> None:
    """Shards of an already-split in-memory corpus (the cached path for the embedded/file/hf corpora):
    the training documents, then the validation ones, each followed by the end-of-text id."""
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer": tokenizer_identity(tokenizer),
        "separator": {"token_id": tokenizer.eos_id, "placement": "after every document"},
        "source": source,
        "shards": [],
        "complete": False,
    }
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, BPETokenizer):
        (folder / TOKENIZER_FILE).write_text(tokenizer.to_dict()["json"], encoding="utf-8")
    for split, docs in (("train", train_docs), ("val", val_docs)):
        total = 0
        arrays = []
        for start in range(0, len(docs), 256):
            arrays.extend(encode_with_separator(tokenizer, docs[start : start + 256], dtype))
        total = sum(len(a) for a in arrays)
        writer = _SplitWriter(
            folder, split, dtype, max(total, 1), 0, {"doc": 0, "offset": 0}, manifest["shards"].append
        )
        for index, ids in enumerate(arrays):
            writer.add(index, ids)
        if writer.fill or total == 0:
            writer.close({"doc": len(docs), "offset": 0})
        manifest[f"{split}_tokens"] = total
    manifest["complete"] = True
    write_json_atomic(folder / MANIFEST, manifest)


def describe(manifest: dict[str, Any]) -> str:
    """One line for the command's final message."""
    tok = manifest["tokenizer"]
    n = {s: sum(1 for e in manifest["shards"] if e["split"] == s) for s in SPLITS}
    return (
        f"{manifest.get('train_tokens', 0):,} training tokens in {n['train']} shards, "
        f"{manifest.get('val_tokens', 0):,} validation tokens in {n['val']}; tokenizer {tok['name']} "
        f"({tok['vocab_size']} ids, {manifest['dtype']}, sha256 {tok['sha256'][:12]})"
    )


def manifest_json(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=1)
