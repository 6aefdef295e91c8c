"""Choosing which parameters of a model to probe.

Probing every matrix would cost as much as running SOAP and DyKAF on the whole model on the side, so
``auto`` picks a few representative hidden matrices: one attention projection and one MLP matrix
from a few evenly spaced blocks. Embeddings and output heads are skipped: their gradients are
sparse / vocabulary-shaped and no Kronecker preconditioner is used for them in practice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from dykaf.baselines.roles import EMBEDDING, HEAD, VECTOR, infer_role

DEFAULT_MAX_LAYERS = 4

_ATTENTION_WORDS = frozenset(
    [
        "attn",
        "attention",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "qkv",
        "query",
        "key",
        "value",
        "wq",
        "wqkv",
    ]
)
_MLP_WORDS = frozenset(
    [
        "mlp",
        "ffn",
        "feed_forward",
        "feedforward",
        "fc",
        "fc1",
        "fc2",
        "linear1",
        "linear2",
        "up_proj",
        "down_proj",
        "gate_proj",
        "w1",
        "w2",
        "w3",
    ]
)


def _tokens(name: str) -> list[str]:
    """Dotted parts of the name and their underscore-separated pieces, lower-case."""
    parts = [p for p in name.lower().split(".") if p]
    return parts + [t for p in parts for t in p.split("_") if t and t != p]


def _role_function(model: nn.Module) -> Callable[[str, Tensor], str]:
    """Role of a parameter: the model's ``param_roles()`` where it declares one, else
    :func:`dykaf.baselines.roles.infer_role` (the same guess the optimizers route by)."""
    declared: dict[str, str] = {}
    if callable(getattr(model, "param_roles", None)):
        declared = dict(model.param_roles())

    def role(name: str, param: Tensor) -> str:
        return declared.get(name) or infer_role(name, param)

    return role


def _is_skipped(role: str) -> bool:
    """Embeddings, output heads and vectors are not probed."""
    return role in (EMBEDDING, HEAD, VECTOR)


def probeable(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters with ≥ 2 dimensions, by name (what a probe can take)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}


def _kind(name: str) -> str:
    tokens = _tokens(name)
    if any(w in tokens for w in _ATTENTION_WORDS):
        return "attn"
    if any(w in tokens for w in _MLP_WORDS):
        return "mlp"
    return "other"


def _block_index(name: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return None if match is None else int(match.group(1))


def _spread(items: Sequence[int], count: int) -> list[int]:
    """``count`` evenly spaced elements of ``items`` including both ends."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(j * (len(items) - 1) / (count - 1))] for j in range(count)]


def select_layers(
    model: nn.Module, layers: str | Sequence[str] = "auto", max_layers: int = DEFAULT_MAX_LAYERS
) -> list[str]:
    """Parameter names to probe: ``"auto"`` or an explicit list (ValueError naming unknown entries).

    Explicit entries may name a parameter or a module whose ``weight`` is a matrix.
    """
    available = probeable(model)
    if isinstance(layers, str):
        if layers != "auto":
            raise ValueError(f'layers must be "auto" or a list of parameter names, got {layers!r}')
        return _auto(model, available, max_layers)
    chosen: list[str] = []
    unknown: list[str] = []
    for entry in layers:
        name = entry if entry in available else f"{entry}.weight"
        if name in available:
            if name not in chosen:
                chosen.append(name)
        else:
            unknown.append(entry)
    if unknown:
        raise ValueError(
            f"cannot probe {unknown}: not trainable parameters with ≥ 2 dimensions; "
            f"available: {sorted(available)}"
        )
    return chosen


def _auto(model: nn.Module, available: dict[str, Tensor], max_layers: int) -> list[str]:
    role = _role_function(model)
    hidden = [n for n, p in available.items() if not _is_skipped(role(n, p))]
    if not hidden or max_layers < 1:
        return []
    blocks: dict[int, dict[str, list[str]]] = {}
    for name in hidden:
        index = _block_index(name)
        if index is not None:
            blocks.setdefault(index, {}).setdefault(_kind(name), []).append(name)
    if not blocks:
        return [hidden[i] for i in _spread(range(len(hidden)), min(max_layers, len(hidden)))]
    picked: list[str] = []
    for index in _spread(sorted(blocks), math.ceil(max_layers / 2)):
        kinds = blocks[index]
        # First attention matrix (the input projection) and first MLP matrix (the up-projection);
        # a block with neither contributes its first matrix.
        candidates = [kinds[k][0] for k in ("attn", "mlp") if k in kinds] or [kinds["other"][0]]
        picked.extend(candidates)
    return picked[:max_layers]
