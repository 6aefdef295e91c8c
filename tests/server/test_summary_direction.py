"""The summary judges a job by its task's primary metric in that metric's direction."""

from __future__ import annotations

import pytest

from server.metrics_registry import metric
from server.summary import RunOutcome, job_summary, primary_of, score_of, target_of


def outcome(label: str, seed: int, acc: float, loss: float) -> RunOutcome:
    return RunOutcome(
        label=label,
        group=label,
        optimizer=label,
        sweep_point={},
        status="succeeded",
        summary={"final_val_loss": loss, "final_val_accuracy": acc, "best_val_accuracy": acc},
        step=10,
        total_steps=10,
    )


def test_higher_accuracy_wins_even_with_a_higher_loss() -> None:
    outcomes = [outcome("adamw", 0, 0.70, 0.5), outcome("dykaf", 0, 0.80, 0.9)]
    result = job_summary(outcomes, primary="val_accuracy")
    assert result["primary_metric"] == "final_val_accuracy"
    assert result["winner"]["label"] == "dykaf"
    assert result["winner"]["margin"] == pytest.approx(0.10)
    assert "above adamw" in result["winner_text"] and "val accuracy" in result["winner_text"]
    assert result["best"]["final_val_accuracy"] == ["dykaf"]
    assert result["best"]["final_val_loss"] == ["adamw"]
    # the default (pre-training) judgement still minimises the loss
    assert job_summary(outcomes)["winner"]["label"] == "adamw"


def test_sweep_point_selection_follows_the_direction() -> None:
    outcomes = [
        RunOutcome("sgd[lr=1]", "sgd", "sgd", {"lr": 1}, "succeeded", {"final_val_accuracy": 0.6}),
        RunOutcome("sgd[lr=2]", "sgd", "sgd", {"lr": 2}, "succeeded", {"final_val_accuracy": 0.9}),
    ]
    rows = job_summary(outcomes, primary="val_accuracy")["rows"]
    assert [r["label"] for r in rows if r["selected"]] == ["sgd[lr=2]"]


def test_primary_and_target_from_a_stored_spec() -> None:
    assert primary_of({"task": {"kind": "pretrain"}}) == "val_loss"
    assert primary_of({"task": {"kind": "classify", "classify": {"primary_metric": "val_mcc"}}}) == "val_mcc"
    assert primary_of({"task": {"kind": "classify"}}) == "val_accuracy"
    assert primary_of({"task": {"kind": "instruct"}}) == "val_exact_match"
    assert target_of({"target_loss": 3.0}) == {"name": "val_loss", "op": "<=", "value": 3.0}
    assert target_of({"target_metric": {"name": "val_f1", "op": ">=", "value": 0.5}})["name"] == "val_f1"
    assert target_of({}) is None


def test_scores_are_lower_is_better_and_missing_values_lose() -> None:
    assert score_of({"final_val_accuracy": 0.8}, "val_accuracy") == -0.8
    assert score_of({"final_val_loss": 2.0}) == 2.0
    assert score_of({}, "val_accuracy") == float("inf")
    assert metric("val_mcc").higher_is_better and not metric("val_loss").higher_is_better
    with pytest.raises(ValueError, match="unknown metric"):
        metric("val_nope")
