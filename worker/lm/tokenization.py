"""Tokenizers behind one small interface: UTF-8 bytes (default, no setup), a byte-level BPE trained on
the training split and cached on disk, and a pretrained Hugging Face model's own tokenizer.

Documents are joined into one token stream with an end-of-text id after each document, which is how
the training windows are cut (see ``worker.lm.data``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from server.jobs.paths import cache_root

if TYPE_CHECKING:
    import torch

EOT = "<|endoftext|>"


class TextTokenizer(Protocol):
    """What the training code needs from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus one end-of-text id (256); works on any text with no training."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "byte"}


class BPETokenizer:
    """A ``tokenizers`` byte-level BPE model; ``vocab_size`` includes the end-of-text token."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        eos = tokenizer.token_to_id(EOT)
        if eos is None:
            raise ValueError(f"BPE tokenizer lacks the {EOT} token")
        self.eos_id = eos

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "json": self._tok.to_str()}


class HFTokenizer:
    """Adapter around a ``transformers`` tokenizer (fine-tuning uses the model's own vocabulary)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.pad_token_id
        if eos is None:
            raise ValueError("the model's tokenizer defines no eos, sep or pad token to separate documents")
        self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "hf", "name_or_path": getattr(self._tok, "name_or_path", "")}


def tokenizer_identity(tokenizer: TextTokenizer) -> dict[str, Any]:
    """What a shard manifest records about the tokenizer: kind, name, sizes and a content hash.

    The hash covers the whole vocabulary and merge rules (BPE, fast HF tokenizers) so two folders
    agree on it exactly when their token ids mean the same strings.
    """
    if isinstance(tokenizer, ByteTokenizer):
        name, content = "utf-8 bytes", "byte-v1"
    elif isinstance(tokenizer, BPETokenizer):
        name, content = f"bpe-{tokenizer.vocab_size}", tokenizer.to_dict()["json"]
    else:
        inner = getattr(tokenizer, "_tok", tokenizer)
        name = str(getattr(inner, "name_or_path", "") or type(inner).__name__)
        backend = getattr(inner, "backend_tokenizer", None)
        if backend is not None:
            content = backend.to_str()
        else:
            import json

            content = json.dumps(sorted(inner.get_vocab().items()))
    return {
        "kind": tokenizer.to_dict()["kind"],
        "name": name,
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": int(tokenizer.eos_id),
        "sha256": hashlib.sha256(content.encode("utf-8")).hexdigest(),
    }


def _bpe_cache_key(texts: Sequence[str], vocab_size: int) -> str:
    digest = hashlib.sha256(f"bpe-v1|{vocab_size}|{len(texts)}|".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()[:24]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_bpe(texts: Sequence[str], vocab_size: int, cache_dir: Path | None = None) -> BPETokenizer:
    """Train (or load from the cache) a byte-level BPE on ``texts``.

    The cache key hashes the vocabulary size and every text, so a changed corpus retrains and an
    unchanged one loads in milliseconds; concurrent runs race harmlessly (atomic replace).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = (cache_dir or cache_root()) / "tokenizers"
    path = directory / f"bpe-{_bpe_cache_key(texts, vocab_size)}.json"
    if path.exists():
        return BPETokenizer.from_json(path.read_text(encoding="utf-8"))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    _write_atomic(path, tokenizer.to_str())
    return BPETokenizer(tokenizer)


def tokenizer_from_dict(data: dict[str, Any]) -> TextTokenizer:
    """Rebuild a byte or BPE tokenizer stored in one of our model exports."""
    kind = data.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_json(data["json"])
    raise ValueError(f"cannot rebuild tokenizer of kind {kind!r} from a checkpoint")


def encode_documents(tokenizer: TextTokenizer, documents: Iterable[str]) -> torch.Tensor:
    """Concatenate the documents' ids with ``eos_id`` after each, as one int32 tensor."""
    import torch  # here, not at the top: prepare-data's worker processes never pay for importing it

    docs = list(documents)
    if isinstance(tokenizer, ByteTokenizer):
        joined = bytearray()
        for doc in docs:
            joined += doc.encode("utf-8")
            joined.append(0)  # placeholder, replaced by eos_id below
        out = (
            torch.frombuffer(joined, dtype=torch.uint8).to(torch.int32)
            if joined
            else torch.empty(0, dtype=torch.int32)
        )
        ends = torch.tensor([len(doc.encode("utf-8")) + 1 for doc in docs], dtype=torch.int64).cumsum(0) - 1
        out[ends] = tokenizer.eos_id
        return out
    batch = getattr(tokenizer, "encode_batch", None)
    encoded = batch(docs) if batch is not None and docs else [tokenizer.encode(doc) for doc in docs]
    total = sum(len(ids) + 1 for ids in encoded)
    out = torch.empty(total, dtype=torch.int32)
    pos = 0
    for ids in encoded:
        out[pos : pos + len(ids)] = torch.as_tensor(ids, dtype=torch.int32)
        pos += len(ids)
        out[pos] = tokenizer.eos_id
        pos += 1
    return out
