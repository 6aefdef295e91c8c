"""Task-quality scores of a fine-tuning run: classification metrics and exact match of generated answers.

Classification metrics come from scikit-learn (the reference implementations GLUE numbers are computed
with); the answer extraction for exact match is ours because it is a convention, not a formula: the
final number of a generation (GSM8K-style chains of thought) or the text after a marker such as
``####``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")

Extraction = Literal["last_number", "marker", "full"]


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Share of predictions equal to the label (NaN for no examples)."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, predictions)) if len(labels) else float("nan")


def macro_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over the classes present in labels or predictions; a class
    with no true and no predicted positive contributes 0 (scikit-learn's ``zero_division=0``)."""
    from sklearn.metrics import f1_score

    if not len(labels):
        return float("nan")
    return float(f1_score(labels, predictions, average="macro", zero_division=0))


def matthews(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Matthews correlation (multi-class form). A degenerate confusion matrix (every label or every
    prediction one class) has a zero denominator; it scores 0, as GLUE's CoLA does."""
    from sklearn.metrics import matthews_corrcoef

    if not len(labels):
        return float("nan")
    return float(matthews_corrcoef(labels, predictions))


def classification_scores(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """The scores every evaluation of a ``classify`` task logs (without the ``val_`` prefix)."""
    return {
        "accuracy": accuracy(labels, predictions),
        "f1": macro_f1(labels, predictions),
        "mcc": matthews(labels, predictions),
    }


def normalize_answer(text: str) -> str:
    """Whitespace collapsed, case folded, surrounding punctuation and thousands separators dropped,
    so ``" 1,200."`` and ``"1200"`` compare equal."""
    text = " ".join(text.split()).strip().strip(".!?;:").strip()
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "")
        if "." in text:
            text = text.rstrip("0").rstrip(".") or "0"
        if text.startswith("-0") and text.strip("-0.") == "":
            text = "0"
    return text.casefold()


def extract_answer(text: str, how: Extraction = "last_number", marker: str = "####") -> str | None:
    """The final answer in a generation or a reference; None when there is none.

    ``last_number``: the last number in the text; ``marker``: the text after the last ``marker``, up to
    the end of that line; ``full``: the whole text.
    """
    if how == "last_number":
        numbers = _NUMBER.findall(text)
        return normalize_answer(numbers[-1]) if numbers else None
    if how == "marker":
        if marker not in text:
            return None
        tail = text.rsplit(marker, 1)[1].strip().split("\n", 1)[0]
        return normalize_answer(tail) if tail.strip() else None
    if how == "full":
        return normalize_answer(text)
    raise ValueError(f"unknown answer extraction {how!r}")


def exact_match(
    generations: Sequence[str],
    references: Sequence[str],
    how: Extraction = "last_number",
    marker: str = "####",
) -> float:
    """Share of generations whose extracted answer equals the reference's (a reference without the
    marker or number is compared whole). A generation with no extractable answer is wrong."""
    if not generations:
        return float("nan")
    hits = 0
    for generated, reference in zip(generations, references, strict=True):
        want = extract_answer(reference, how, marker)
        if want is None:
            want = normalize_answer(reference)
        hits += extract_answer(generated, how, marker) == want
    return hits / len(generations)
