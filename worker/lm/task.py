"""Build a language-model task from a ``TaskSpec``: model, tokenizer, token streams, parameter roles.

Model initialisation (and LoRA adapter initialisation) happens under a forked RNG seeded by the run's
seed, so every optimizer compared at that seed starts from the same weights and the caller's RNG is
left untouched. Tokenised corpora are memoised per process because a local comparison builds the
same data for every run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from worker.lm.corpora import load_documents, split_documents
from worker.lm.hf import apply_lora, load_pretrained, logits_of, max_context, param_roles
from worker.lm.model import GPT, GPTConfig
from worker.lm.tokenization import ByteTokenizer, TextTokenizer, encode_documents, train_bpe
from worker.spec import CorpusSpec, TaskSpec, TokenizerSpec


@dataclass
class LMTask:
    """Everything the training loop needs about the task, nothing about the optimizer."""

    kind: str
    model: nn.Module
    tokenizer: TextTokenizer
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    roles: dict[str, str]
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] = logits_of
    info: dict[str, Any] = field(default_factory=dict)
    # Example-based tasks (classify, instruct) bring their own batches (``.batch(index)`` →
    # (inputs, targets), inputs a dict of tensors), loss and per-evaluation quality metrics; token
    # tasks leave them None and the runner cuts windows from the token streams.
    train_batches: Any = None
    val_batches: list[Any] | None = None
    loss_fn: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor] | None = None
    eval_metrics: Callable[[nn.Module, torch.device], dict[str, float]] | None = None

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]


@functools.lru_cache(maxsize=4)
def _pretrain_data(corpus_json: str, tokenizer_json: str) -> tuple[TextTokenizer, torch.Tensor, torch.Tensor]:
    corpus = CorpusSpec.model_validate_json(corpus_json)
    tok_spec = TokenizerSpec.model_validate_json(tokenizer_json)
    train_docs, val_docs = split_documents(load_documents(corpus), corpus.val_fraction)
    tokenizer: TextTokenizer
    tokenizer = ByteTokenizer() if tok_spec.kind == "byte" else train_bpe(train_docs, tok_spec.vocab_size)
    return tokenizer, encode_documents(tokenizer, train_docs), encode_documents(tokenizer, val_docs)


_FINETUNE_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _finetune_tokens(
    corpus: CorpusSpec, model_ref: str, tokenizer: TextTokenizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus in the pretrained model's vocabulary, memoised per (corpus, model reference)."""
    key = (corpus.model_dump_json(), model_ref)
    if key not in _FINETUNE_CACHE:
        train_docs, val_docs = split_documents(load_documents(corpus), corpus.val_fraction)
        if len(_FINETUNE_CACHE) >= 2:
            _FINETUNE_CACHE.clear()
        _FINETUNE_CACHE[key] = (
            encode_documents(tokenizer, train_docs),
            encode_documents(tokenizer, val_docs),
        )
    return _FINETUNE_CACHE[key]


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _build_supervised(spec: TaskSpec, seed: int) -> LMTask:
    """A classify or instruct task (``worker.lm.classify``, ``worker.lm.instruct``)."""
    if spec.kind == "classify":
        from worker.lm.classify import build_classify as build
    else:
        from worker.lm.instruct import build_instruct as build
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


def build_task(spec: TaskSpec, seed: int) -> LMTask:
    """Construct the task on the CPU (the runner moves the model to its device)."""
    if spec.kind in ("classify", "instruct"):
        return _build_supervised(spec, seed)
    if spec.kind == "pretrain":
        tokenizer, train, val = _pretrain_data(
            spec.corpus.model_dump_json(), spec.tokenizer.model_dump_json()
        )
        config = GPTConfig(
            vocab_size=tokenizer.vocab_size,
            n_layer=spec.n_layer,
            n_head=spec.n_head,
            d_model=spec.d_model,
            context=spec.context,
            dropout=spec.dropout,
            tie_weights=spec.tie_weights,
        )
        model = _seeded(seed, lambda: GPT(config))
        origin = "gpt"
    else:
        assert spec.finetune is not None
        model, tokenizer, origin = load_pretrained(spec.finetune.model)
        limit = max_context(model)
        if limit is not None and spec.context > limit:
            raise ValueError(
                f"task.context ({spec.context}) exceeds the pretrained model's maximum ({limit})"
            )
        if isinstance(model, GPT):
            model.set_dropout(spec.dropout)
        lora = spec.finetune.lora
        if lora is not None:
            pretrained = model
            model = _seeded(seed, lambda: apply_lora(pretrained, lora, origin))
        train, val = _finetune_tokens(spec.corpus, spec.finetune.model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {
        "origin": origin,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": len(train),
        "val_tokens": len(val),
    }
    return LMTask(
        kind=spec.kind,
        model=model,
        tokenizer=tokenizer,
        train_tokens=train,
        val_tokens=val,
        roles=param_roles(model),
        info=info,
    )
