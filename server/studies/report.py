"""A study's results from its stored runs: winners, edge flags, baseline curve, speed-ups.

Pure functions over ``RunRecord`` values (no database), so the selection and the speed-ups can be
checked against an exhaustive offline computation on the same runs.

The winner of an optimizer at a scale is recomputed here by the rule the job used to pick the point
it confirmed on every seed (``server.crud.runs.expand_next_stage``): among its first-seed sweep
runs that succeeded, the lowest final validation loss, the earliest point on ties. Its final loss
is then read over all seeds at that point; the baseline's curve comes from its winner at 1× (the
same runs) and at each larger budget (the ``@2x``… groups the study added to the job).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.studies import speedup
from server.studies.spec import StudySpec, budget_label

SELECTION_METRIC = "final_val_loss"
SUCCEEDED = "succeeded"
PENDING = ("queued", "running")


@dataclass(frozen=True)
class RunRecord:
    """What the report needs of one stored run."""

    group: str
    sweep_point: Mapping[str, Any]
    seed: int
    status: str
    tokens: float
    summary: Mapping[str, Any] = field(default_factory=dict)
    run_seconds: float | None = None

    @property
    def loss(self) -> float:
        value = self.summary.get(SELECTION_METRIC) if self.status == SUCCEEDED else None
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.inf

    @property
    def seconds(self) -> float | None:
        value = self.summary.get("train_time_s")
        if isinstance(value, int | float) and value > 0:
            return float(value)
        return self.run_seconds if self.run_seconds and self.run_seconds > 0 else None


def tokens_of(task: Mapping[str, Any]) -> float:
    """Training tokens a task plans: steps × sequences per step × sequence length."""
    explicit = task.get("tokens")
    if isinstance(explicit, int | float) and explicit > 0:
        return float(explicit)
    per_step = task["batch_size"] * task.get("grad_accum", 1) * task.get("devices_per_run", 1)
    return float(task["steps"] * per_step * task["context"])


def pick_winner(runs: Sequence[RunRecord], group: str, first_seed: int) -> RunRecord | None:
    """The first-seed sweep run of ``group`` with the lowest final validation loss (earliest on ties)."""
    best: RunRecord | None = None
    for run in runs:
        if run.group != group or run.seed != first_seed:
            continue
        if best is None or run.loss < best.loss:
            best = run
    return best if best is not None and math.isfinite(best.loss) else None


def edge_flags(display: str, sweep: Mapping[str, Sequence[Any]], point: Mapping[str, Any]) -> list[str]:
    """Hyperparameters whose winning value is the largest or smallest tried (an untuned optimum)."""
    flags = []
    for key, values in sorted(sweep.items()):
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        value = point.get(key)
        if len(set(numbers)) < 2 or value not in numbers or isinstance(value, bool):
            continue
        if value == max(numbers):
            flags.append(f"{display}: {key} {value:g} is the largest tried: extend the grid")
        elif value == min(numbers):
            flags.append(f"{display}: {key} {value:g} is the smallest tried: extend the grid")
    return flags


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _at_point(runs: Sequence[RunRecord], group: str, point: Mapping[str, Any]) -> list[RunRecord]:
    return [r for r in runs if r.group == group and dict(r.sweep_point) == dict(point)]


def _curve_point(multiplier: float, runs: Sequence[RunRecord]) -> dict[str, Any]:
    ended = [r for r in runs if r.status not in PENDING]
    losses = [r.loss for r in ended]
    mean, std = speedup.mean_std(losses)
    seconds = [s for r in ended if (s := r.seconds) is not None]
    return {
        "multiplier": multiplier,
        "tokens": runs[0].tokens if runs else None,
        "seconds": sum(seconds) / len(seconds) if seconds else None,
        "loss_mean": mean,
        "loss_std": std,
        "seeds": sum(math.isfinite(x) for x in losses),
        "pending": len(runs) - len(ended),
    }


def scale_report(spec: StudySpec, index: int, runs: Sequence[RunRecord]) -> dict[str, Any]:
    """Per optimizer at one scale: sweep grid, winner, edge flags, loss over seeds, speed-ups."""
    first_seed = spec.seeds[0]
    curve: list[dict[str, Any]] = []
    baseline_winner = pick_winner(runs, spec.baseline, first_seed)
    if baseline_winner is not None:
        point = baseline_winner.sweep_point
        curve.append(_curve_point(1.0, _at_point(runs, spec.baseline, point)))
        for multiplier in spec.budgets:
            curve.append(
                _curve_point(multiplier, _at_point(runs, budget_label(spec.baseline, multiplier), point))
            )
    measured = [p for p in curve if p["loss_mean"] is not None and p["pending"] == 0]
    curve_ready = len(measured) == len(spec.budgets) + 1
    params = next((r.summary["parameters"] for r in runs if "parameters" in r.summary), None)
    rows = []
    for opt in spec.optimizers:
        sweep = [
            {
                "point": dict(r.sweep_point),
                "loss": _finite(r.loss),
                "status": r.status,
            }
            for r in runs
            if r.group == opt.display and r.seed == first_seed
        ]
        winner = pick_winner(runs, opt.display, first_seed)
        row: dict[str, Any] = {
            "optimizer": opt.display,
            "sweep_points": opt.sweep_size(),
            "sweep": sweep,
            "winner": None if winner is None else dict(winner.sweep_point),
            "edges": [] if winner is None else edge_flags(opt.display, opt.sweep, winner.sweep_point),
            "loss_mean": None,
            "loss_std": None,
            "seeds": 0,
            "pending": sum(r.status in PENDING for r in runs if r.group == opt.display),
            "tokens": None,
            "seconds": None,
            "token_speedup": None,
            "time_speedup": None,
        }
        if winner is not None:
            confirmed = [
                r for r in _at_point(runs, opt.display, winner.sweep_point) if r.status not in PENDING
            ]
            losses = [r.loss for r in confirmed]
            row["loss_mean"], row["loss_std"] = speedup.mean_std(losses)
            row["seeds"] = sum(math.isfinite(x) for x in losses)
            row["tokens"] = confirmed[0].tokens if confirmed else None
            seconds = [s for r in confirmed if (s := r.seconds) is not None]
            row["seconds"] = sum(seconds) / len(seconds) if seconds else None
            if curve_ready and confirmed:
                tokens = [p["tokens"] for p in measured]
                base_losses = [p["loss_mean"] for p in measured]
                row["token_speedup"] = speedup.speedup(
                    tokens, base_losses, losses, [r.tokens for r in confirmed]
                ).as_dict()
                if all(p["seconds"] for p in measured) and len(seconds) == len(confirmed):
                    row["time_speedup"] = speedup.speedup(
                        [p["seconds"] for p in measured], base_losses, losses, seconds
                    ).as_dict()
        rows.append(row)
    return {
        "name": spec.scales[index].name,
        "parameters": params,
        "tokens": tokens_of(spec.scales[index].task.model_dump()),
        "baseline_curve": curve,
        "curve_ready": curve_ready,
        "optimizers": rows,
    }


def study_report(spec: StudySpec, runs_by_scale: Sequence[Sequence[RunRecord]]) -> dict[str, Any]:
    """The whole study: one ``scale_report`` per scale, and the warnings a reader must see."""
    scales = [scale_report(spec, i, runs) for i, runs in enumerate(runs_by_scale)]
    warnings = [f"{s['name']}: {e}" for s in scales for row in s["optimizers"] for e in row["edges"]]
    if not spec.equal_budgets():
        sizes = ", ".join(f"{opt.display} {opt.sweep_size()}" for opt in spec.optimizers)
        warnings.insert(0, f"unequal tuning budgets (sweep points: {sizes}), allowed by the study")
    return {
        "baseline": spec.baseline,
        "budgets": [1.0, *spec.budgets],
        "scales": scales,
        "warnings": warnings,
    }


CSV_COLUMNS = (
    "scale",
    "parameters",
    "optimizer",
    "winner",
    "edge",
    "seeds",
    "final_loss_mean",
    "final_loss_std",
    "tokens",
    "token_speedup",
    "token_speedup_bound",
    "token_speedup_std",
    "time_speedup",
    "time_speedup_bound",
    "time_speedup_std",
    "speedup_text",
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def csv_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """``study.csv``: one line per scale × optimizer (winner hyperparameters as ``k=v;k=v``)."""
    lines = []
    for scale in report["scales"]:
        for row in scale["optimizers"]:
            tok = row["token_speedup"] or {}
            tim = row["time_speedup"] or {}
            winner = row["winner"]
            shown = (
                ";".join(f"{k}={_cell(v)}" for k, v in sorted(winner.items())) if winner is not None else ""
            )
            lines.append(
                [
                    _cell(v)
                    for v in (
                        scale["name"],
                        scale["parameters"],
                        row["optimizer"],
                        shown,
                        " | ".join(row["edges"]),
                        row["seeds"],
                        row["loss_mean"],
                        row["loss_std"],
                        row["tokens"],
                        tok.get("value"),
                        tok.get("bound"),
                        tok.get("std"),
                        tim.get("value"),
                        tim.get("bound"),
                        tim.get("std"),
                        tok.get("text"),
                    )
                ]
            )
    return lines
