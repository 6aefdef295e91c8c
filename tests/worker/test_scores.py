"""Task-quality scores against values computed by hand."""

from __future__ import annotations

import math

import pytest

from worker.lm.scores import accuracy, exact_match, extract_answer, macro_f1, matthews


def test_accuracy_by_hand() -> None:
    assert accuracy([0, 1, 1, 0, 2], [0, 1, 0, 0, 1]) == pytest.approx(3 / 5)
    assert math.isnan(accuracy([], []))


def test_macro_f1_by_hand() -> None:
    # class 0: tp=2 fp=1 fn=0 -> p=2/3 r=1 f1=0.8; class 1: tp=1 fp=0 fn=1 -> p=1 r=1/2 f1=2/3
    assert macro_f1([0, 0, 1, 1], [0, 0, 1, 0]) == pytest.approx((0.8 + 2 / 3) / 2)


def test_mcc_binary_by_hand() -> None:
    # tp=2 tn=1 fp=1 fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    labels = [1, 1, 1, 0, 0]
    preds = [1, 1, 0, 1, 0]
    assert matthews(labels, preds) == pytest.approx(1 / 6)
    assert matthews([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_mcc_degenerate_confusion_matrix_is_zero() -> None:
    # every prediction one class: the denominator is zero, the score is 0, not NaN
    assert matthews([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0
    # every label one class
    assert matthews([1, 1, 1], [1, 0, 1]) == 0.0


def test_mcc_multiclass_by_hand() -> None:
    # Gorodkin's R_K: c = correct, s = samples, p_k = predicted counts, t_k = true counts
    labels = [0, 1, 2, 0, 1, 2]
    preds = [0, 2, 2, 0, 1, 1]
    c, s = 4, 6
    t = [2, 2, 2]
    p = [2, 2, 2]
    expected = (c * s - sum(a * b for a, b in zip(p, t, strict=True))) / math.sqrt(
        (s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t))
    )
    assert matthews(labels, preds) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "how", "expected"),
    [
        ("She has 3 apples, then 4 more, so 7.", "last_number", "7"),
        ("The answer is -12.50", "last_number", "-12.5"),
        ("total 1,200 coins", "last_number", "1200"),
        ("no digits here", "last_number", None),
        ("3 + 4 = 7\n#### 7\nextra", "marker", "7"),
        ("#### Paris.", "marker", "paris"),
        ("the answer is 7", "marker", None),
        ("  Yes. ", "full", "yes"),
    ],
)
def test_extract_answer(text: str, how: str, expected: str | None) -> None:
    assert extract_answer(text, how) == expected  # type: ignore[arg-type]


def test_exact_match_counts_missing_answers_as_wrong() -> None:
    gens = ["so 7", "it is 8", "I do not know"]
    refs = ["#### 7", "#### 9", "#### 3"]
    assert exact_match(gens, refs, "last_number") == pytest.approx(1 / 3)
    assert exact_match(["#### 7", "7"], ["#### 7", "#### 7"], "marker") == pytest.approx(1 / 2)
