"""The offline demo tasks are deterministic, balanced and correct."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from worker.lm.demos import STDLIB_MODULES, demo_splits
from worker.lm.scores import extract_answer


@pytest.mark.parametrize("name", ["stdlib_module", "pydoc_topic"])
def test_classification_demos_are_deterministic_with_five_labels(name: str) -> None:
    a, b = demo_splits(name, 300), demo_splits(name, 300)
    assert a == b
    labels = Counter(r["label"] for r in a["train"] + a["validation"])
    assert len(labels) == 5
    assert max(labels.values()) <= 300 // 5
    assert {r["text"] for r in a["train"]}.isdisjoint(
        {r["text"] for r in a["validation"]}
    ) or name == "pydoc_topic"


def test_stdlib_snippets_come_from_their_module() -> None:
    import importlib
    import inspect

    for record in demo_splits("stdlib_module", 100)["validation"]:
        assert record["label"] in STDLIB_MODULES
        source = inspect.getsource(importlib.import_module(record["label"]))
        assert record["text"].splitlines()[0] in source


def test_arithmetic_answers_are_right() -> None:
    for record in demo_splits("arithmetic", 200)["train"]:
        a, b, c = (int(x) for x in re.findall(r"\d+", record["prompt"]))
        expected = a + b + c if "finds" in record["prompt"] else a + b - c
        assert extract_answer(record["answer"], "marker") == str(expected)
        assert extract_answer(record["answer"], "last_number") == str(expected)
