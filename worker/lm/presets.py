"""Model presets (``task.preset``, defined beside the job schema) with their sizes in parameters and in
Chinchilla-optimal training tokens (20 per parameter, Hoffmann et al. 2022).

Models are built on the ``meta`` device: shapes without memory, so even ``llama-1b`` counts instantly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.table import Table

from server.jobs.spec import PRESETS, TaskSpec
from worker.lm.task import build_model

CHINCHILLA_TOKENS_PER_PARAMETER = 20
# Used for presets without a vocabulary of their own (the tiny ones follow the tokenizer).
DEFAULT_VOCAB = 257


@dataclass(frozen=True)
class PresetSize:
    name: str
    parameters: int
    published: int | None

    @property
    def chinchilla_tokens(self) -> int:
        return CHINCHILLA_TOKENS_PER_PARAMETER * self.parameters


def preset_parameters(name: str, vocab_size: int | None = None) -> int:
    """Parameter count of ``name`` as this code builds it (vocabulary: the preset's, else given)."""
    spec = TaskSpec(preset=name)
    vocab = vocab_size or spec.vocab_size or DEFAULT_VOCAB
    with torch.device("meta"):
        model = build_model(spec, vocab)
    return sum(p.numel() for p in model.parameters())


def preset_sizes() -> list[PresetSize]:
    return [PresetSize(name, preset_parameters(name), p.published_parameters) for name, p in PRESETS.items()]


def describe_preset(name: str, vocab_size: int | None = None) -> str:
    n = preset_parameters(name, vocab_size)
    tokens = CHINCHILLA_TOKENS_PER_PARAMETER * n
    return f"preset {name}: {n / 1e6:,.1f} M parameters, Chinchilla {tokens / 1e9:,.2f} B tokens"


def preset_table() -> Table:
    table = Table(title="model presets (task.preset)")
    for column in (
        "preset",
        "arch",
        "layers",
        "heads",
        "width",
        "context",
        "vocab",
        "parameters",
        "published",
        "Chinchilla tokens",
    ):
        table.add_column(column)
    for size in preset_sizes():
        p = PRESETS[size.name]
        table.add_row(
            size.name,
            p.arch,
            str(p.n_layer),
            str(p.n_head),
            str(p.d_model),
            str(p.context),
            str(p.vocab_size or "tokenizer"),
            f"{size.parameters / 1e6:,.1f} M",
            f"{size.published / 1e6:,.1f} M" if size.published else "-",
            f"{size.chinchilla_tokens / 1e9:,.2f} B",
        )
    return table
