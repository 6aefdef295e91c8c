"""Token shards on disk: a folder of raw fixed-dtype token files plus one JSON manifest.

Layout of a shard folder::

    manifest.json         format, dtype, tokenizer identity, source, separator, one entry per shard
    tokenizer.json        only for a BPE trained by ``prepare-data`` (so the folder is self-contained)
    train-000000.bin      little-endian uint16 (vocabulary ≤ 65 536) or uint32 tokens, no header
    val-000000.bin        validation shards: documents held out by a hash of their content

The files carry no header so that ``numpy.memmap`` maps them as they are; everything that describes
them lives in the manifest, which records each shard's token count (checked against the file size
whenever the folder is opened), the largest token in it (checked against the model's vocabulary) and
where in the source it ends (so that an interrupted ``prepare-data`` resumes after the last finished
shard). Documents are joined with the tokenizer's end-of-text id after each one, the same stream the
in-memory path produced, so one training window means the same tokens on either path.

``TokenSpace`` is the read side: the shards of one split concatenated into one virtual array that is
never loaded, only mapped; reading a window touches at most two files. Pages of a mapped file that
were read count towards the process's resident memory until unmapped, so an epoch over 2 GB of
shards would end with 2 GB resident (reclaimable, but alarming and counted by schedulers); the token
space therefore drops its mapped pages (``madvise(MADV_DONTNEED)``: they stay in the page cache, so a
re-read costs no disk access) after every ``RELEASE_BYTES`` it has touched, counting each read as at
least 2 MiB (a fault maps a whole large folio of the page cache, not only the pages read).
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "dykaf-lab/token-shards-v1"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
# Resident mapped pages allowed to accumulate before they are dropped; each read is counted as at
# least 2 MiB because the kernel maps pages around a fault (fault-around, large folios up to a PMD),
# not only the ones read. Dropping costs microseconds.
RELEASE_BYTES = 64 * 2**20
_FAULT_AROUND = 2 * 2**20


class ShardError(ValueError):
    """A shard folder that cannot be used as it is; the message says what is wrong and what to do."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every token id (uint16 up to 65 536 ids)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.bin"


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` atomically so a reader never sees half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest, checked for the fields every reader relies on."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ShardError(
            f"shard folder {str(folder)!r} does not exist; create it with `dykaf-lab prepare-data`"
        )
    if not path.is_file():
        raise ShardError(
            f"{str(folder)!r} has no {MANIFEST}; it is not a shard folder written by `dykaf-lab prepare-data`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}); re-run `dykaf-lab prepare-data`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShardError(f"{path} is not a {FORMAT} manifest")
    missing = [key for key in ("dtype", "tokenizer", "shards", "separator") if key not in data]
    if missing:
        raise ShardError(f"{path} lacks {', '.join(missing)}; re-run `dykaf-lab prepare-data`")
    tokenizer = data["tokenizer"]
    if not isinstance(tokenizer, dict) or not {"vocab_size", "eos_id", "sha256"} <= set(tokenizer):
        raise ShardError(f"{path}: the tokenizer entry lacks vocab_size, eos_id or sha256")
    if data["dtype"] not in ("uint16", "uint32"):
        raise ShardError(f"{path}: dtype {data['dtype']!r} is neither uint16 nor uint32")
    for entry in data["shards"]:
        if not isinstance(entry, dict) or entry.get("split") not in SPLITS or "file" not in entry:
            raise ShardError(f"{path}: malformed shard entry {entry!r}")
        if Path(entry["file"]).name != entry["file"]:
            raise ShardError(f"{path}: shard file {entry['file']!r} must be a plain name inside the folder")
    return data


def check_shard_file(folder: Path, entry: dict[str, Any], dtype: np.dtype) -> None:
    """The file exists and holds exactly the manifest's token count."""
    path = folder / entry["file"]
    expected = int(entry["tokens"]) * dtype.itemsize
    if not path.is_file():
        raise ShardError(f"shard {entry['file']} listed in the manifest of {str(folder)!r} is missing")
    size = path.stat().st_size
    if size != expected:
        raise ShardError(
            f"shard {path} has {size} bytes but the manifest says {entry['tokens']} tokens "
            f"({expected} bytes of {dtype.name}); the folder is damaged: re-run `dykaf-lab prepare-data` "
            "into a fresh folder"
        )


class TokenSpace:
    """Several token arrays read as one: ``len()``, ``window(start, length)`` and ``gather``.

    Arrays may be ``numpy.memmap``s (shards), in-memory numpy arrays or torch tensors (converted
    without copying); nothing is concatenated, so memory does not grow with the corpus.
    """

    def __init__(self, parts: Sequence[Any]) -> None:
        arrays = []
        for part in parts:
            if hasattr(part, "numpy") and not isinstance(part, np.ndarray):
                part = part.detach().cpu().numpy()
            if len(part):
                arrays.append(part)
        self.parts: list[np.ndarray] = arrays
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        # ends[i] = first global position after part i; starts[i] = its first position.
        self.ends = np.cumsum(lengths)
        self.starts = self.ends - lengths
        self.total = int(self.ends[-1]) if len(arrays) else 0
        self._touched = 0

    def release(self) -> None:
        """Unmap the pages read so far (memory-mapped parts only; their data stay in the page cache)."""
        self._touched = 0
        for part in self.parts:
            handle = getattr(part, "_mmap", None)
            if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
                handle.madvise(mmap.MADV_DONTNEED)

    def __len__(self) -> int:
        return self.total

    def window(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64 (copied, crossing shard borders if needed)."""
        if start < 0 or start + length > self.total:
            raise IndexError(f"window [{start}, {start + length}) outside {self.total} tokens")
        if out is None:
            out = np.empty(length, dtype=np.int64)
        part = int(np.searchsorted(self.ends, start, side="right"))
        self._touched += max(length * self.parts[part].itemsize, _FAULT_AROUND)
        if self._touched > RELEASE_BYTES:
            self.release()
        filled = 0
        while filled < length:
            local = start + filled - int(self.starts[part])
            take = min(length - filled, len(self.parts[part]) - local)
            out[filled : filled + take] = self.parts[part][local : local + take]
            filled += take
            part += 1
        return out

    def gather(self, starts: Iterable[int], length: int) -> np.ndarray:
        """Rows of ``length`` tokens at each start, shape (len(starts), length), int64."""
        starts = list(starts)
        rows = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts):
            self.window(int(start), length, rows[row])
        return rows

    def max_token(self) -> int:
        return max((int(a.max()) for a in self.parts), default=-1)


@dataclass
class ShardSet:
    """An opened, checked shard folder: the manifest and the train and validation token spaces."""

    folder: Path
    manifest: dict[str, Any]
    train: TokenSpace
    val: TokenSpace
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def max_token(self) -> int:
        return max((int(e.get("max_token", -1)) for e in self.manifest["shards"]), default=-1)

    def check_context(self, context: int) -> None:
        """Both splits hold at least one window of ``context + 1`` tokens; a clear error otherwise."""
        for name, space in (("training", self.train), ("validation", self.val)):
            if len(space) < context + 1:
                raise ShardError(
                    f"the {name} shards of {str(self.folder)!r} hold {len(space)} tokens, too few for one "
                    f"window of context + 1 = {context + 1}; shorten task.context or prepare more data"
                )

    def check_vocab(self, model_vocab: int) -> None:
        """Every token id in the shards indexes a row of the model's embedding."""
        if self.vocab_size > model_vocab or self.max_token >= model_vocab:
            raise ShardError(
                f"the shards in {str(self.folder)!r} were made with a tokenizer of {self.vocab_size} ids "
                f"(largest id used: {self.max_token}) but the model's vocabulary has {model_vocab}; "
                "set task.vocab_size to at least the tokenizer's (or leave it unset)"
            )


def open_shards(folder: str | os.PathLike[str]) -> ShardSet:
    """Open a shard folder for reading: manifest checked, every file's size checked, files mapped."""
    root = Path(folder)
    manifest = read_manifest(root)
    if not manifest.get("complete", False):
        raise ShardError(
            f"{str(root)!r} holds an unfinished `prepare-data` run; re-run the same command to finish it"
        )
    dtype = np.dtype(manifest["dtype"])
    spaces: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for entry in manifest["shards"]:
        check_shard_file(root, entry, dtype)
        if int(entry["tokens"]):
            spaces[entry["split"]].append(np.memmap(root / entry["file"], dtype=dtype, mode="r"))
    shards = ShardSet(root, manifest, TokenSpace(spaces["train"]), TokenSpace(spaces["val"]))
    if not len(shards.train):
        raise ShardError(f"{str(root)!r} has no training tokens")
    if not len(shards.val):
        raise ShardError(f"{str(root)!r} has no validation shard; prepare it with a larger --val-fraction")
    return shards
