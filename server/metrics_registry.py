"""Which direction is better for each metric a run reports, and which one judges a task.

The summary picks winners and sweep points by the task's primary metric, the runner decides when a
run reached its ``target_metric``, and the dashboard marks the best column value; all of them read the
direction here so that an accuracy is never minimised.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    title: str

    @property
    def better(self) -> str:
        """``"max"`` or ``"min"`` (the vocabulary of the summary's column directions)."""
        return "max" if self.higher_is_better else "min"


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("val_loss", False, "val loss"),
        Metric("val_ppl", False, "val perplexity"),
        Metric("train_loss", False, "train loss"),
        Metric("val_accuracy", True, "val accuracy"),
        Metric("val_f1", True, "val macro-F1"),
        Metric("val_mcc", True, "val Matthews corr."),
        Metric("val_exact_match", True, "val exact match"),
    )
}

# The metric each task kind is judged by unless the task names another.
PRIMARY_BY_KIND = {
    "pretrain": "val_loss",
    "finetune": "val_loss",
    "classify": "val_accuracy",
    "instruct": "val_exact_match",
}

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


def metric(name: str) -> Metric:
    """The registered metric, or an error naming the accepted ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; accepted: {', '.join(METRICS)}") from None


def summary_key(name: str) -> str:
    """The run-summary key holding a metric's value at the end of the run (``final_val_accuracy``)."""
    return f"final_{name}"


def best_key(name: str) -> str:
    return f"best_{name}"
