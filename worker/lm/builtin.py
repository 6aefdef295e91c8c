"""Built-in tiny models (``builtin:tiny-bert``, ``builtin:tiny-gpt2``) and the text codec every
classification/instruct task tokenises through.

The built-in models are transformers architectures created from a small config with random weights
on a byte vocabulary: nothing is downloaded, so the demo tasks and the tests run offline through
exactly the code that serves a hub model (only the ``from_pretrained`` call differs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BYTE_BOS, BYTE_SEP, BYTE_PAD = 256, 257, 258
BYTE_VOCAB = 259


@dataclass
class Codec:
    """Text ↔ ids with the special ids a task needs. ``pair`` builds a model's own pair layout."""

    encode: Any  # str -> list[int], without special tokens
    decode: Any  # Sequence[int] -> str
    pad_id: int
    eos_id: int
    bos_id: int | None = None
    sep_id: int | None = None
    hf: Any = None  # the transformers tokenizer, when there is one

    def pair(self, text: str, text_pair: str | None, max_length: int) -> list[int]:
        """One classification input: the model's special tokens around one text or a pair, truncated."""
        if self.hf is not None:
            out = self.hf(text, text_pair, truncation=True, max_length=max_length)
            return list(out["input_ids"])
        ids = ([self.bos_id] if self.bos_id is not None else []) + self.encode(text)
        if text_pair is not None:
            ids += [self.sep_id if self.sep_id is not None else self.eos_id, *self.encode(text_pair)]
        return ids[:max_length]


def byte_codec() -> Codec:
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    return Codec(encode, decode, pad_id=BYTE_PAD, eos_id=BYTE_SEP, bos_id=BYTE_BOS, sep_id=BYTE_SEP)


def hf_codec(tokenizer: Any) -> Codec:
    """A transformers tokenizer; a missing pad token borrows the end-of-text one (GPT-2, LLaMA)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return Codec(encode, decode, pad_id=tokenizer.pad_token_id, eos_id=eos, hf=tokenizer)


def text_tokenizer_codec(tokenizer: Any) -> Codec:
    """One of our own tokenizers (a pre-training export's byte or BPE tokenizer)."""
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos = tokenizer.vocab_size - 1
    return Codec(tokenizer.encode, tokenizer.decode, pad_id=eos, eos_id=eos)


def builtin_config(name: str, context: int, num_labels: int | None = None) -> Any:
    """The config of a built-in model (two layers, width 64, byte vocabulary)."""
    from transformers import BertConfig, GPT2Config

    extra: dict[str, Any] = {} if num_labels is None else {"num_labels": num_labels}
    if name == "builtin:tiny-bert":
        return BertConfig(
            vocab_size=BYTE_VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=max(context, 8),
            pad_token_id=BYTE_PAD,
            **extra,
        )
    if name == "builtin:tiny-gpt2":
        return GPT2Config(
            vocab_size=BYTE_VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=2,
            n_positions=max(context, 8),
            bos_token_id=BYTE_BOS,
            eos_token_id=BYTE_SEP,
            pad_token_id=BYTE_PAD,
            **extra,
        )
    raise ValueError(f"unknown built-in model {name!r}")
