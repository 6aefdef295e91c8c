"""Parameter roles, so each optimizer is applied where practitioners apply it.

Muon is only meant for hidden weight matrices (embeddings, the output head and 1-D parameters go
to AdamW), and Shampoo cannot hold a vocabulary-sized factor. A caller can state roles
explicitly (``build_optimizer(..., roles=model.param_roles())``); otherwise :func:`infer_role`
guesses from names and shapes the way common GPT/Llama/BERT checkpoints are named.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

EMBEDDING = "embedding"
HEAD = "head"
HIDDEN = "hidden"
VECTOR = "vector"
ROLES: tuple[str, ...] = (EMBEDDING, HEAD, HIDDEN, VECTOR)

_EMBEDDING_HINTS = ("embed", "wte", "wpe", "tok_emb", "pos_emb", "word_embeddings", "position_embeddings")
_HEAD_HINTS = ("lm_head", "output.weight", "classifier", "score.weight")


def infer_role(name: str, param: Tensor) -> str:
    """Best guess of a parameter's role from its name and number of dimensions."""
    if param.ndim < 2:
        return VECTOR
    lowered = name.lower()
    if any(hint in lowered for hint in _EMBEDDING_HINTS):
        return EMBEDDING
    if any(hint in lowered for hint in _HEAD_HINTS):
        return HEAD
    return HIDDEN


def resolve_roles(
    named_parameters: Iterable[tuple[str, Tensor]], roles: Mapping[str, str] | None
) -> list[tuple[str, Tensor, str]]:
    """Attach a role to every ``(name, param)``: explicit ones first, inferred otherwise."""
    resolved = []
    for name, param in named_parameters:
        role = (roles or {}).get(name) or infer_role(name, param)
        if role not in ROLES:
            raise ValueError(f"parameter {name!r} has role {role!r}; roles are {', '.join(ROLES)}")
        resolved.append((name, param, role))
    return resolved
