"""Build a language-model task from a ``TaskSpec``: model, tokenizer, token shards, parameter roles.

Model initialisation (and LoRA adapter initialisation) happens under a forked RNG seeded by the run's
seed, so every optimizer compared at that seed starts from the same weights and the caller's RNG is
left untouched. Every corpus is read from token shards: a prepared folder (``corpus.name: shards``)
as it is, any other corpus tokenised once into shards under the cache, named by a hash of the
tokenizer and the documents, so there is one data path. Opened shards are memoised per process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.jobs.paths import cache_root, confine_path
from server.jobs.spec import CorpusSpec, TaskSpec, TokenizerSpec
from worker.lm.classify import build_classify
from worker.lm.corpora import load_documents, split_documents
from worker.lm.hf import apply_lora, load_pretrained, logits_of, max_context, param_roles
from worker.lm.instruct import build_instruct
from worker.lm.llama import Llama, LlamaConfig
from worker.lm.model import GPT, GPTConfig
from worker.lm.prepare import load_hf_tokenizer, write_document_shards
from worker.lm.shards import MANIFEST, TOKENIZER_FILE, ShardError, ShardSet, TokenSpace, open_shards
from worker.lm.throughput import flops_per_token
from worker.lm.tokenization import BPETokenizer, ByteTokenizer, TextTokenizer, tokenizer_identity, train_bpe

SHARD_CACHE_VERSION = "shards-v1"
log = logging.getLogger(__name__)


@dataclass
class LMTask:
    """Everything the training loop needs about the task, nothing about the optimizer.

    ``train_tokens`` and ``val_tokens`` are token spaces over memory-mapped shards (``worker.lm.shards``):
    every corpus, embedded or prepared, is read the same way.
    """

    kind: str
    model: nn.Module
    tokenizer: TextTokenizer
    train_tokens: TokenSpace
    val_tokens: TokenSpace
    roles: dict[str, str]
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] = logits_of
    info: dict[str, Any] = field(default_factory=dict)
    shards: ShardSet | None = None
    # Example-based tasks (classify, instruct) bring their own batches (``.batch(index)`` →
    # (inputs, targets), inputs a dict of tensors), loss and per-evaluation quality metrics; token
    # tasks leave them None and the runner cuts windows from the token streams.
    train_batches: Any = None
    val_batches: list[Any] | None = None
    loss_fn: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor] | None = None
    eval_metrics: Callable[[nn.Module, torch.device], dict[str, float]] | None = None

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]


def _documents_digest(tokenizer: TextTokenizer, train_docs: list[str], val_docs: list[str]) -> str:
    """Content hash naming a cached shard folder: the tokenizer's hash and every document's."""
    digest = hashlib.sha256(f"{SHARD_CACHE_VERSION}|{tokenizer_identity(tokenizer)['sha256']}|".encode())
    for split, docs in (("train", train_docs), ("val", val_docs)):
        digest.update(f"|{split}:{len(docs)}|".encode())
        for doc in docs:
            digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return digest.hexdigest()[:32]


def cached_shards(
    tokenizer: TextTokenizer, train_docs: list[str], val_docs: list[str], source: dict[str, Any]
) -> ShardSet:
    """The in-memory corpus as shards under the cache, written on first use and found by content hash.

    Written into a private temporary folder and renamed into place, so concurrent workers preparing
    the same corpus race harmlessly (the loser's copy is discarded).
    """
    root = cache_root() / "shards"
    folder = root / _documents_digest(tokenizer, train_docs, val_docs)
    if not (folder / MANIFEST).is_file():
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            write_document_shards(scratch, tokenizer, train_docs, val_docs, source)
            try:
                os.rename(scratch, folder)
            except OSError:
                if not (folder / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return open_shards(folder)


class ManifestTokenizer:
    """A shard folder's tokenizer when only its manifest is at hand (a hub tokenizer not cached here):
    enough for training, which needs ids, not text."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity
        self.vocab_size = int(identity["vocab_size"])
        self.eos_id = int(identity["eos_id"])

    def encode(self, text: str) -> list[int]:
        raise RuntimeError(f"tokenizer {self.identity.get('name')!r} is not available on this worker")

    def decode(self, ids: Any) -> str:
        raise RuntimeError(f"tokenizer {self.identity.get('name')!r} is not available on this worker")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.identity.get("kind", "hf"), "name_or_path": self.identity.get("name", "")}


def shard_tokenizer(shards: ShardSet) -> TextTokenizer:
    """Rebuild the tokenizer a shard folder was made with (byte, its saved BPE, or a HF tokenizer)."""
    identity = shards.manifest["tokenizer"]
    if identity.get("kind") == "byte":
        return ByteTokenizer()
    saved = shards.folder / TOKENIZER_FILE
    if identity.get("kind") == "bpe" and saved.is_file():
        return BPETokenizer.from_json(saved.read_text(encoding="utf-8"))
    if identity.get("kind") == "hf":
        with contextlib.suppress(Exception):
            return load_hf_tokenizer(str(identity.get("name", "")))
    return ManifestTokenizer(identity)


@functools.lru_cache(maxsize=4)
def _pretrain_data(corpus_json: str, tokenizer_json: str) -> tuple[TextTokenizer, ShardSet]:
    corpus = CorpusSpec.model_validate_json(corpus_json)
    tok_spec = TokenizerSpec.model_validate_json(tokenizer_json)
    if corpus.name == "shards":
        assert corpus.path is not None
        shards = open_shards(confine_path(corpus.path))
        return shard_tokenizer(shards), shards
    train_docs, val_docs = split_documents(load_documents(corpus), corpus.val_fraction)
    tokenizer: TextTokenizer
    tokenizer = ByteTokenizer() if tok_spec.kind == "byte" else train_bpe(train_docs, tok_spec.vocab_size)
    source = {"kind": "corpus", **corpus.model_dump()}
    return tokenizer, cached_shards(tokenizer, train_docs, val_docs, source)


def _finetune_shards(corpus: CorpusSpec, model_ref: str, tokenizer: TextTokenizer) -> ShardSet:
    """The corpus in the pretrained model's vocabulary (shards cached by content, like pre-training)."""
    if corpus.name == "shards":
        assert corpus.path is not None
        shards = open_shards(confine_path(corpus.path))
        if shards.manifest["tokenizer"]["sha256"] != tokenizer_identity(tokenizer)["sha256"]:
            raise ShardError(
                f"the shards in {corpus.path!r} were made with tokenizer "
                f"{shards.manifest['tokenizer'].get('name')!r}, not the pretrained model's ({model_ref!r}); "
                "prepare them with `--tokenizer` set to the model"
            )
        return shards
    train_docs, val_docs = split_documents(load_documents(corpus), corpus.val_fraction)
    source = {"kind": "corpus", "model": model_ref, **corpus.model_dump()}
    return cached_shards(tokenizer, train_docs, val_docs, source)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _build_supervised(spec: TaskSpec, seed: int) -> LMTask:
    """A classify or instruct task (``worker.lm.classify``, ``worker.lm.instruct``)."""
    build = build_classify if spec.kind == "classify" else build_instruct
    parts = build(spec, seed, _seeded)
    empty = torch.zeros(0, dtype=torch.long)
    info = {
        "origin": parts.info.get("origin", "hf"),
        "parameters": sum(p.numel() for p in parts.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in parts.model.parameters() if p.requires_grad),
        **{k: v for k, v in parts.info.items() if k != "origin"},
    }
    return LMTask(
        kind=spec.kind,
        model=parts.model,
        tokenizer=parts.codec,  # type: ignore[arg-type]
        train_tokens=empty,
        val_tokens=empty,
        roles=parts.roles,
        info=info,
        train_batches=parts.train_batches,
        val_batches=parts.val_batches,
        loss_fn=parts.loss_fn,
        eval_metrics=parts.eval_metrics,
    )


def build_model(spec: TaskSpec, vocab_size: int) -> nn.Module:
    """The pre-training model named by ``task.arch`` (on whatever device is current: meta works)."""
    if spec.arch == "llama":
        return Llama(
            LlamaConfig(
                vocab_size=vocab_size,
                n_layer=spec.n_layer,
                n_head=spec.n_head,
                d_model=spec.d_model,
                context=spec.context,
                ffn_hidden=spec.ffn_hidden,
                dropout=spec.dropout,
                tie_weights=spec.tie_weights,
            )
        )
    return GPT(
        GPTConfig(
            vocab_size=vocab_size,
            n_layer=spec.n_layer,
            n_head=spec.n_head,
            d_model=spec.d_model,
            context=spec.context,
            dropout=spec.dropout,
            tie_weights=spec.tie_weights,
        )
    )


def _embedding_rows(model: nn.Module) -> int | None:
    base: Any = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_in = getattr(base, "get_input_embeddings", None)
    if callable(get_in):
        return int(get_in().num_embeddings)
    for module in base.modules():
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings)
    return None


def build_task(spec: TaskSpec, seed: int) -> LMTask:
    """Construct the task on the CPU (the runner moves the model to its device).

    Data problems (a damaged shard folder, a vocabulary the model cannot embed, a context longer than
    a split) raise here, before any training.
    """
    if spec.kind in ("classify", "instruct"):
        return _build_supervised(spec, seed)
    if spec.kind == "pretrain":
        tokenizer, shards = _pretrain_data(spec.corpus.model_dump_json(), spec.tokenizer.model_dump_json())
        vocab = spec.vocab_size or shards.vocab_size
        shards.check_vocab(vocab)
        shards.check_context(spec.context)
        model = _seeded(seed, lambda: build_model(spec, vocab))
        origin = spec.arch
    else:
        assert spec.finetune is not None
        model, tokenizer, origin = load_pretrained(spec.finetune.model)
        limit = max_context(model)
        if limit is not None and spec.context > limit:
            raise ValueError(
                f"task.context ({spec.context}) exceeds the pretrained model's maximum ({limit})"
            )
        if hasattr(model, "set_dropout"):
            model.set_dropout(spec.dropout)
        lora = spec.finetune.lora
        if lora is not None:
            pretrained = model
            model = _seeded(seed, lambda: apply_lora(pretrained, lora, origin))
        shards = _finetune_shards(spec.corpus, spec.finetune.model, tokenizer)
        rows = _embedding_rows(model)
        if rows is not None:
            shards.check_vocab(rows)
        shards.check_context(spec.context)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {
        "origin": origin,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": len(shards.train),
        "val_tokens": len(shards.val),
        "flops_per_token": flops_per_token(model, spec.context),
        "chinchilla_tokens": 20 * n_params,
    }
    if spec.preset is not None:
        log.info(
            "preset %s: %.1f M parameters, Chinchilla %.2f B tokens (20/parameter); this run trains %.2f B",
            spec.preset,
            n_params / 1e6,
            20 * n_params / 1e9,
            spec.steps * spec.tokens_per_step / 1e9,
        )
    return LMTask(
        kind=spec.kind,
        model=model,
        tokenizer=tokenizer,
        train_tokens=shards.train,
        val_tokens=shards.val,
        roles=param_roles(model),
        info=info,
        shards=shards,
    )
