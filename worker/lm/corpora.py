"""Text corpora as lists of documents, and a deterministic train/validation split.

Embedded corpora need no download, so a first job runs anywhere: the Python documentation topics
(``pydoc_data.topics``, English prose) and the standard library's own source (code). Local text,
JSONL and Parquet files and Hugging Face datasets (by name, or a local dataset directory) are read
with the same cap on size. Note that the embedded corpora come from the running Python, so their
exact content differs between Python versions.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from server.jobs.paths import cache_root, confine_path
from server.jobs.spec import CorpusSpec, looks_like_local_path

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
# Directories of the standard library that are tests, vendored packages or not library code.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
# Below this many documents the split is made inside each document instead of between documents.
_MIN_DOCS_FOR_DOC_SPLIT = 20


def pydoc_documents() -> Iterator[str]:
    """The documentation topics shipped with Python (``help('topics')``), sorted by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def stdlib_code_documents() -> Iterator[str]:
    """The standard library's ``.py`` files (no tests or vendored packages), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if not _STDLIB_SKIP.intersection(path.relative_to(root).parts[:-1])
    ]
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def _file_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json", ".ndjson"}:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise ValueError(f"cannot tell the format of {path.name!r}; set corpus.format to text, jsonl or parquet")


def _read_one_file(path: Path, fmt: str, text_field: str) -> Iterator[str]:
    if fmt == "text":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif fmt == "jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise ValueError(f"{path.name} line {number} has no field {text_field!r}")
                yield str(record[text_field])
    else:
        import pyarrow.parquet as pq

        # Row group by row group: a large Parquet file is never read whole.
        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise ValueError(f"{path.name} has no column {text_field!r}")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield str(value)


def file_documents(path: str, fmt: str = "auto", text_field: str = "text") -> Iterator[str]:
    """Documents from a local file, or from every readable file in a directory (sorted by path);
    ``path`` must lie inside the data roots (it comes from a job spec)."""
    yield from read_files(confine_path(path), fmt, text_field)


def read_files(root: Path, fmt: str = "auto", text_field: str = "text") -> Iterator[str]:
    """Documents from the file ``root`` or every readable file below the folder ``root``."""
    if root.is_dir():
        files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        files = [
            p
            for p in files
            if fmt != "auto" or p.suffix.lower() in TEXT_SUFFIXES | {".jsonl", ".json", ".ndjson", ".parquet"}
        ]
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(f"corpus path {str(root)!r} does not exist")
    for file in files:
        yield from _read_one_file(file, _file_format(file, fmt), text_field)


def hf_documents(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    """A Hugging Face dataset's text column; ``name`` may be a hub id or a local dataset directory."""
    import datasets

    source = str(confine_path(name)) if looks_like_local_path(name) else name
    dataset = datasets.load_dataset(source, config, split=split, cache_dir=str(cache_root() / "hf-datasets"))
    if text_field not in dataset.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_field!r}; columns: {dataset.column_names}")
    for value in dataset[text_field]:
        if value:
            yield str(value)


def _capped(documents: Iterable[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for doc in documents:
        if not doc:
            continue
        if total + len(doc) >= max_chars:
            out.append(doc[: max_chars - total])
            break
        out.append(doc)
        total += len(doc)
    return out


def load_documents(spec: CorpusSpec) -> list[str]:
    """The corpus named by ``spec`` as documents, in a fixed order, capped at ``spec.max_chars``."""
    if spec.name == "pydoc":
        docs: Iterable[str] = pydoc_documents()
    elif spec.name == "stdlib_code":
        docs = stdlib_code_documents()
    elif spec.name == "file":
        assert spec.path is not None
        docs = file_documents(spec.path, spec.format, spec.text_field)
    else:
        assert spec.hf_name is not None
        docs = hf_documents(spec.hf_name, spec.hf_config, spec.hf_split, spec.text_field)
    out = _capped(docs, spec.max_chars)
    if not out:
        raise ValueError(f"corpus {spec.name!r} yielded no text")
    return out


def _held_out(doc: str, val_fraction: float) -> bool:
    """Hash of the content decides: stable under reordering and additions to the corpus."""
    bucket = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") / 2**64
    return bucket < val_fraction


def _split_inside(doc: str, val_fraction: float) -> tuple[str, str]:
    """Hold out the tail of a document, cut at a line break when one is near."""
    cut = int(len(doc) * (1.0 - val_fraction))
    newline = doc.rfind("\n", 0, cut)
    if newline > cut - 2000 and newline > 0:
        cut = newline + 1
    return doc[:cut], doc[cut:]


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split.

    With enough documents, whole documents are held out by a content hash (no leakage between a
    document's halves); with few documents, or when hashing happens to hold out none, the tail of each
    document is held out instead.
    """
    if len(docs) >= _MIN_DOCS_FOR_DOC_SPLIT:
        train = [doc for doc in docs if not _held_out(doc, val_fraction)]
        val = [doc for doc in docs if _held_out(doc, val_fraction)]
        if train and val:
            return train, val
    pairs = [_split_inside(doc, val_fraction) for doc in docs]
    return [a for a, _ in pairs if a], [b for _, b in pairs if b]
