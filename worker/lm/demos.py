"""Offline demo tasks built from text that ships with Python, so a first classification and a first
instruct comparison need no download.

- ``stdlib_module``: which standard-library module a 6-line source snippet comes from (5 classes).
- ``pydoc_topic``: which pydoc topic a paragraph belongs to (the 5 topics with most paragraphs).
- ``arithmetic``: two-step word problems with a worked answer ending in ``#### <number>``.

Every demo is a pure function of its size: the same examples for every run and every worker (the
run's seed changes the order of batches, never the data).
"""

from __future__ import annotations

import importlib
import inspect
import random
from typing import Any

STDLIB_MODULES = ("json", "argparse", "logging", "csv", "ftplib")
_SNIPPET_LINES = 6
DATA_SEED = 1234
VAL_SHARE = 0.2


def _split(examples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    random.Random(DATA_SEED).shuffle(examples)
    n_val = max(1, int(len(examples) * VAL_SHARE))
    return {"train": examples[n_val:], "validation": examples[:n_val]}


def _balanced(pools: dict[str, list[str]], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` examples drawn round-robin from each label's pool (classes stay balanced)."""
    rng = random.Random(DATA_SEED)
    for pool in pools.values():
        rng.shuffle(pool)
    out: list[dict[str, Any]] = []
    per_label = max(1, n // len(pools))
    for label, pool in pools.items():
        out.extend({"text": text, "label": label} for text in pool[:per_label])
    return out


def stdlib_module(n: int) -> dict[str, list[dict[str, Any]]]:
    """Snippets of ``_SNIPPET_LINES`` non-blank lines of each module's source, labelled by module."""
    pools: dict[str, list[str]] = {}
    for name in STDLIB_MODULES:
        lines = [
            line for line in inspect.getsource(importlib.import_module(name)).splitlines() if line.strip()
        ]
        step = _SNIPPET_LINES // 2
        pools[name] = [
            "\n".join(lines[i : i + _SNIPPET_LINES]) for i in range(0, len(lines) - _SNIPPET_LINES, step)
        ]
    return _split(_balanced(pools, n))


def pydoc_topic(n: int) -> dict[str, list[dict[str, Any]]]:
    """Paragraphs of the pydoc topics with the most paragraphs, labelled by topic."""
    from pydoc_data.topics import topics

    paragraphs = {
        name: [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80] for name, text in topics.items()
    }
    chosen = sorted(paragraphs, key=lambda k: (-len(paragraphs[k]), k))[:5]
    return _split(_balanced({name: paragraphs[name] for name in chosen}, n))


_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana")
_THINGS = ("apples", "books", "coins", "marbles", "stamps", "shells")


def arithmetic(n: int, seed: int = DATA_SEED) -> dict[str, list[dict[str, Any]]]:
    """Word problems ``a ± b`` then ``± c`` with small numbers and a worked answer."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        who, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b, c = rng.randint(2, 40), rng.randint(1, 20), rng.randint(1, 20)
        gains = rng.random() < 0.5
        first = a + b
        total = first + c if gains else first - min(c, first)
        c = c if gains else min(c, first)
        verb = "finds" if gains else "gives away"
        prompt = f"{who} has {a} {thing} and gets {b} more, then {verb} {c}. How many {thing} now?"
        sign = "+" if gains else "-"
        answer = f"{a} + {b} = {first}. {first} {sign} {c} = {total}. #### {total}"
        examples.append({"prompt": prompt, "answer": answer})
    return _split(examples)


DEMOS = {"stdlib_module": stdlib_module, "pydoc_topic": pydoc_topic, "arithmetic": arithmetic}


def demo_splits(name: str, n: int) -> dict[str, list[dict[str, Any]]]:
    return DEMOS[name](n)
