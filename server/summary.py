"""The summary of a comparison job, computed once: per-optimizer rows, the winner, time to target
and the Fisher verdict.

``dykaf-lab run`` (``worker.local``), the REST API (``GET /jobs/{id}/summary`` and
``summary.csv``), the CLI (``dykaf-lab watch``, ``./lab up``) and the dashboard all show what this
module returns; none of them recomputes it.

Only runs that **finished their schedule** (status ``succeeded``) enter the means: a run that was
cancelled, failed or diverged part-way is counted in its row (``partial``) but never averaged with
finished ones, since a loss at 23 % of the schedule is not comparable with a loss at 100 %. Runs
still queued or running are counted as ``pending``.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.jobs.status import RunStatus
from server.metrics_registry import METRICS, PRIMARY_BY_KIND, summary_key
from server.metrics_registry import metric as metric_info
from server.summary_fields import INTEGER_FIELDS, integer_cell

FINISHED = RunStatus.SUCCEEDED
ENDED_EARLY = (RunStatus.DIVERGED, RunStatus.FAILED, RunStatus.CANCELLED)
PENDING = (RunStatus.QUEUED, RunStatus.RUNNING)

# The number a job is judged by unless its task names another (``primary_of``): the same key picks
# sweep winners, with the direction the metric registry gives.
DEFAULT_PRIMARY = "val_loss"
PRIMARY_METRIC = summary_key(DEFAULT_PRIMARY)
PRIMARY_TITLE = "final val loss"
BASELINE_OPTIMIZER = "adamw"  # speed-ups to target are relative to its fastest configuration

SUMMARY_METRICS = (
    "final_val_loss",
    "best_val_loss",
    "final_train_loss",
    "steps_to_target",
    "time_to_target_s",
    "train_time_s",
    "step_time_ms",
    "fwd_bwd_ms",
    "optimizer_ms",
    "tokens_per_s",
    "mfu",
    "peak_memory_mb",
    "fisher_overhead",
)
TARGET_METRICS = ("steps_to_target", "time_to_target_s")
# Task-quality metrics (classify, instruct): final and best value, in the rows only when some run has them.
TASK_METRICS = tuple(
    f"{when}_{name}"
    for name in METRICS
    if name not in ("val_loss", "val_ppl", "train_loss")
    for when in ("final", "best")
)


def primary_of(spec: Mapping[str, Any] | None) -> str:
    """The metric name a job (its spec as stored/submitted) is judged by: ``task.classify.primary_metric``
    for a classification task, else the default of its task kind."""
    task = (spec or {}).get("task") or {}
    kind = task.get("kind", "pretrain")
    chosen = (task.get(kind) or {}).get("primary_metric") if kind in ("classify", "instruct") else None
    return chosen or PRIMARY_BY_KIND.get(kind, DEFAULT_PRIMARY)


def target_of(spec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A job's target as ``{name, op, value}``: ``target_metric``, or ``target_loss`` as ``val_loss <= x``."""
    spec = spec or {}
    if spec.get("target_metric"):
        return dict(spec["target_metric"])
    if spec.get("target_loss") is not None:
        return {"name": "val_loss", "op": "<=", "value": spec["target_loss"]}
    return None


@dataclass(frozen=True)
class RunOutcome:
    """What the summary needs of one run, wherever it ran (this process, or a server's run row)."""

    label: str
    group: str
    optimizer: str
    sweep_point: Mapping[str, Any]
    status: str
    summary: Mapping[str, Any] | None
    step: int = 0
    total_steps: int = 0

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def partial(self) -> bool:
        """Ended before its schedule did (cancelled, failed or diverged)."""
        return self.status in ENDED_EARLY

    def value(self, key: str) -> float:
        value = (self.summary or {}).get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0, len(finite)


def summarize_outcomes(
    outcomes: Sequence[RunOutcome], selected: Mapping[str, str] | None = None, *, has_target: bool = False
) -> list[dict[str, Any]]:
    """One row per label (optimizer configuration), in run order.

    Counts: ``seeds`` (runs of the label), ``succeeded`` (finished their schedule), ``partial``
    (stopped early: ``diverged`` + ``failed`` + ``cancelled``, each also counted alone), ``pending``.
    ``complete`` is true when every run of the label finished. Each metric's ``_mean``/``_std``/``_n``
    are over the finished runs only (steps/seconds to target: the finished runs that reached it).
    ``selected`` (group → label) marks each group's selected sweep point; without it every label is.
    With a target, ``speedup_steps``/``speedup_time`` compare mean steps (seconds) to target with the
    fastest AdamW configuration (``baseline``).
    """
    by_label: dict[str, list[RunOutcome]] = defaultdict(list)
    for outcome in outcomes:
        by_label[outcome.label].append(outcome)
    selected = selected or {}
    present = {key for o in outcomes for key in (o.summary or {})}
    rows = []
    for label, group in by_label.items():
        first = group[0]
        done = [r for r in group if r.finished]
        row: dict[str, Any] = {
            "group": first.group,
            "label": label,
            "optimizer": first.optimizer,
            "sweep_point": ";".join(f"{k}={v}" for k, v in sorted(first.sweep_point.items())),
            "selected": selected.get(first.group, label) == label,
            "seeds": len(group),
            "succeeded": len(done),
            "partial": sum(r.partial for r in group),
            "diverged": sum(r.status == RunStatus.DIVERGED for r in group),
            "failed": sum(r.status == RunStatus.FAILED for r in group),
            "cancelled": sum(r.status == RunStatus.CANCELLED for r in group),
            "pending": sum(r.status in PENDING for r in group),
        }
        row["complete"] = row["succeeded"] == row["seeds"]
        if has_target:
            row["reached_target"] = sum(r.value("reached_target") == 1.0 for r in done)
        for key in SUMMARY_METRICS + tuple(k for k in TASK_METRICS if k in present):
            mean, std, n = _mean_std(r.value(key) for r in done)
            row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"] = mean, std, n
        share, _, _ = _mean_std(r.value("optimizer_ms") / r.value("step_time_ms") for r in done)
        row["optimizer_share_mean"] = share
        rows.append(row)
    if has_target:
        _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    reached = [r for r in rows if r["optimizer"] == BASELINE_OPTIMIZER and r["steps_to_target_n"] > 0]
    base = min(reached, key=lambda r: r["steps_to_target_mean"], default=None)
    for row in rows:
        row["baseline"] = row is base
        row["speedup_steps"] = row["speedup_time"] = math.nan
        if base is None:
            continue
        if row["steps_to_target_n"] > 0 and row["steps_to_target_mean"] > 0:
            row["speedup_steps"] = base["steps_to_target_mean"] / row["steps_to_target_mean"]
        if (
            row["time_to_target_s_n"] > 0
            and base["time_to_target_s_n"] > 0
            and row["time_to_target_s_mean"] > 0
        ):
            row["speedup_time"] = base["time_to_target_s_mean"] / row["time_to_target_s_mean"]


# Columns of the summary table with the direction that is better (None: not a merit of the
# optimizer, never marked) and whether they exist only with a target loss. ``best_by_column`` marks
# them; the dashboard shows them in this order.
COLUMNS: tuple[tuple[str, str | None, bool], ...] = (
    ("final_val_loss", "min", False),
    ("best_val_loss", "min", False),
    ("steps_to_target", "min", True),
    ("time_to_target_s", "min", True),
    ("speedup_steps", "max", True),
    ("speedup_time", "max", True),
    ("step_time_ms", "min", False),
    ("optimizer_share", "min", False),
    ("peak_memory_mb", "min", False),
    ("tokens_per_s", "max", False),
    ("mfu", "max", False),
    ("diverged", "min", False),
    ("fisher_overhead", None, False),  # what the probes cost, kept out of every time above
)


def columns_for(rows: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, str | None, bool], ...]:
    """``COLUMNS`` preceded by the task-quality metrics the rows carry (final value, higher better)."""
    extra = tuple(
        (key, metric_info(key.removeprefix("final_")).better, False)
        for key in TASK_METRICS
        if key.startswith("final_") and any(f"{key}_mean" in r for r in rows)
    )
    return extra + COLUMNS


def column_value(row: Mapping[str, Any], key: str) -> float:
    """The number compared for "best in column": a mean, a ratio, or a count of ended runs."""
    if key == "diverged":
        return float(row["diverged"]) if row["seeds"] > row["pending"] else math.nan
    value = row.get(f"{key}_mean", row.get(key))
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def best_by_column(rows: Sequence[Mapping[str, Any]], has_target: bool) -> dict[str, list[str]]:
    """Per column, the labels holding the best value (ties all marked); empty with fewer than two
    rows having a value, or when they all agree (nothing to distinguish)."""
    out: dict[str, list[str]] = {}
    for key, better, target in columns_for(rows):
        if target and not has_target:
            continue
        values = [(r["label"], column_value(r, key)) for r in rows]
        values = [(label, v) for label, v in values if math.isfinite(v)]
        out[key] = []
        if better is None or len(values) < 2:
            continue
        best = (max if better == "max" else min)(v for _, v in values)
        if all(v == best for _, v in values):
            continue
        out[key] = [label for label, v in values if v == best]
    return out


def select_points(rows: Sequence[Mapping[str, Any]], primary: str = DEFAULT_PRIMARY) -> dict[str, str]:
    """Each group's selected sweep point, when the caller did not record one (a server's job): among
    the group's labels that ran on the most seeds (a ``first_seed`` job's second stage runs only the
    chosen point), the best ``row_score``; the first such label while none has a score."""
    selected: dict[str, str] = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        pool = [r for r in rows if r["group"] == group]
        most = max(r["seeds"] for r in pool)
        pool = [r for r in pool if r["seeds"] == most]
        selected[group] = min(pool, key=lambda r: row_score(r, primary))["label"]
    return selected


def signed(value: float, primary: str) -> float:
    """``value`` turned into a lower-is-better score for ``primary``'s direction."""
    return -value if metric_info(primary).higher_is_better else value


def score_of(summary: Mapping[str, Any] | None, primary: str = DEFAULT_PRIMARY) -> float:
    """One run's lower-is-better score by the primary metric; +inf without a finite value."""
    value = (summary or {}).get(summary_key(primary))
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return signed(float(value), primary)
    return math.inf


def row_score(row: Mapping[str, Any], primary: str = DEFAULT_PRIMARY) -> float:
    """Primary metric of a row whose every seed finished, as a lower-is-better score; +inf otherwise
    (a diverged seed loses)."""
    value = row.get(f"{summary_key(primary)}_mean", math.nan)
    return signed(value, primary) if row["complete"] and math.isfinite(value) else math.inf


def pick_winner(rows: Sequence[Mapping[str, Any]], primary: str = DEFAULT_PRIMARY) -> dict[str, Any] | None:
    """The best selected configuration by the primary metric, once the comparison is whole.

    None while any run is pending, when a run failed or was cancelled (the comparison is missing a
    contestant), or when no configuration finished every seed. A configuration with a diverged seed
    is not eligible (it loses).
    """
    if not rows or any(r["pending"] or r["failed"] or r["cancelled"] for r in rows):
        return None

    def score(row: Mapping[str, Any]) -> float:
        return row_score(row, primary)

    pool = sorted((r for r in rows if r["selected"]), key=score)
    if not pool or not math.isfinite(score(pool[0])):
        return None
    best = pool[0]
    runner_up = pool[1] if len(pool) > 1 and math.isfinite(score(pool[1])) else None
    key = summary_key(primary)
    return {
        "label": best["label"],
        "optimizer": best["optimizer"],
        "metric": key,
        "title": f"final {metric_info(primary).title}",
        "higher_is_better": metric_info(primary).higher_is_better,
        "mean": best[f"{key}_mean"],
        "std": best[f"{key}_std"],
        "seeds": best["seeds"],
        "runner_up": runner_up["label"] if runner_up else None,
        # how far the runner-up is behind, always >= 0 (its mean minus the winner's when lower is better)
        "margin": score(runner_up) - score(best) if runner_up else None,
    }


def winner_text(winner: Mapping[str, Any] | None) -> str | None:
    """``"dykaf: final val loss 3.2140 ± 0.0100 (2 seeds), 0.0213 below muon"``."""
    if winner is None:
        return None
    spread = f" ± {winner['std']:.4f}" if winner["seeds"] > 1 else ""
    seeds = f"{winner['seeds']} seed{'s' * (winner['seeds'] != 1)}"
    title = winner.get("title", PRIMARY_TITLE)
    text = f"{winner['label']}: {title} {winner['mean']:.4f}{spread} ({seeds})"
    if winner["runner_up"] is not None:
        side = "above" if winner.get("higher_is_better") else "below"
        text += f", {winner['margin']:.4f} {side} {winner['runner_up']}"
    return text


# ---------------------------------------------------------------------------------- Fisher verdict

# Fisher methods in display order with their display names (the dashboard's legends use these).
METHOD_NAMES: dict[str, str] = {
    "optimal": "optimal (floor)",
    "own": "own",
    "dykaf": "DyKAF",
    "dykaf_seq": "DyKAF-seq",
    "soap_shampoo": "SOAP/Shampoo",
}

# (label, layer, metric, method) -> {step: mean over seeds}
FisherMeans = dict[tuple[str, str, str, str], dict[int, float]]


def fisher_means(rows_by_label: Mapping[str, Iterable[Sequence[Any]]]) -> FisherMeans:
    """Mean over a label's seeds of each ``(step, layer, method, metric, value)`` row; non-finite
    values are left out (a probe reports them for no method, but a diverging run may)."""
    acc: dict[tuple[str, str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label, rows in rows_by_label.items():
        for step, layer, method, metric, value in rows:
            if value is not None and math.isfinite(value):
                acc[(label, layer, metric, method)][int(step)].append(float(value))
    return {
        key: {step: statistics.fmean(values) for step, values in sorted(per_step.items())}
        for key, per_step in acc.items()
    }


def stream_label(labels: Sequence[str], optimizers: Mapping[str, str]) -> str:
    """The configuration whose gradients the verdict is about: the first DyKAF one, else the first."""
    return next((label for label in labels if optimizers[label].startswith("dykaf")), labels[0])


@dataclass
class FisherGaps:
    """How far above the floor each method's Kronecker estimate sits on one gradient stream."""

    label: str
    gaps: list[tuple[str, float]] = field(default_factory=list)  # (method, mean gap), display order
    layers: int = 0
    reports: int = 0
    closed: float | None = None  # share of SOAP/Shampoo's gap DyKAF's factors close

    def verdict(self) -> str | None:
        if not self.gaps:
            return None
        layers, reports = self.layers, self.reports
        parts = " · ".join(f"{METHOD_NAMES[m]} {gap:.4f}" for m, gap in self.gaps)
        text = (
            f"On {self.label}'s gradients ({layers} layer{'s' * (layers != 1)} × {reports} "
            f"report{'s' * (reports != 1)}), mean kron_rel_err above the floor: {parts}."
        )
        if self.closed is not None:
            if self.closed >= 0:
                text += f" DyKAF's factors close {100 * self.closed:.0f}% of SOAP/Shampoo's gap."
            else:
                further = -100 * self.closed
                text += f" DyKAF's factors sit {further:.0f}% further from the floor than SOAP/Shampoo's."
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "gaps": [{"method": m, "name": METHOD_NAMES[m], "gap": gap} for m, gap in self.gaps],
            "layers": self.layers,
            "reports": self.reports,
            "closed": self.closed,
            "verdict": self.verdict(),
        }


def fisher_gaps(means: FisherMeans, label: str) -> FisherGaps:
    """Each method's ``kron_rel_err`` minus the floor's at the same layer and report, averaged over
    every (layer, report) where both exist; and the share of SOAP/Shampoo's gap that DyKAF's factors
    close over the points that have both (None when there is none or SOAP sits at the floor)."""
    points: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for (lb, layer, metric, method), values in means.items():
        if lb == label and metric == "kron_rel_err":
            for step, value in values.items():
                points[(layer, step)][method] = value
    with_floor = {key: v for key, v in points.items() if "optimal" in v}
    out = FisherGaps(label)
    for method in METHOD_NAMES:
        diffs = [v[method] - v["optimal"] for v in with_floor.values() if method in v and method != "optimal"]
        if diffs:
            out.gaps.append((method, statistics.fmean(diffs)))
    if not out.gaps:
        return out
    out.layers = len({layer for layer, _ in with_floor})
    out.reports = len({step for _, step in with_floor})
    both = [v for v in with_floor.values() if "dykaf" in v and "soap_shampoo" in v]
    soap_gap = sum(v["soap_shampoo"] - v["optimal"] for v in both)
    if both and soap_gap > 0:
        out.closed = 1 - sum(v["dykaf"] - v["optimal"] for v in both) / soap_gap
    return out


def fisher_verdict(means: FisherMeans, label: str) -> str | None:
    """One sentence: whose factors track the Fisher best on ``label``'s gradients (None without a
    floor or anything to compare)."""
    return fisher_gaps(means, label).verdict()


def fisher_summary(
    rows_by_label: Mapping[str, Iterable[Sequence[Any]]], labels: Sequence[str], optimizers: Mapping[str, str]
) -> dict[str, Any] | None:
    """The verdict on the default gradient stream plus the gaps on every configuration's stream."""
    means = fisher_means(rows_by_label)
    measured = [label for label in labels if any(key[0] == label for key in means)]
    if not measured:
        return None
    label = stream_label(measured, optimizers)
    by_label = {lb: fisher_gaps(means, lb).as_dict() for lb in measured}
    return {"label": label, "verdict": by_label[label]["verdict"], "by_label": by_label}


# ---------------------------------------------------------------------------------- the whole job


def job_summary(
    outcomes: Sequence[RunOutcome],
    *,
    selected: Mapping[str, str] | None = None,
    target_loss: float | None = None,
    fisher_rows: Mapping[str, Iterable[Sequence[Any]]] | None = None,
    primary: str = DEFAULT_PRIMARY,
    target: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a reader of a job's results is shown, as one dict (NaN kept as float; ``jsonable``
    turns it into null). Without ``selected`` each group's point is chosen by ``select_points``.
    ``primary`` names the metric the job is judged by (``primary_of``); ``target`` is its
    ``{name, op, value}`` target (``target_of``), ``target_loss`` the older spelling of a val-loss one."""
    if target is None and target_loss is not None:
        target = {"name": "val_loss", "op": "<=", "value": target_loss}
    has_target = target is not None
    rows = summarize_outcomes(outcomes, selected, has_target=has_target)
    if selected is None:
        rows = summarize_outcomes(outcomes, select_points(rows, primary), has_target=has_target)
    winner = pick_winner(rows, primary)
    labels = list(dict.fromkeys(o.label for o in outcomes))
    optimizers = {o.label: o.optimizer for o in outcomes}
    fisher = fisher_summary(fisher_rows, labels, optimizers) if fisher_rows else None
    return {
        "primary_metric": summary_key(primary),
        "primary": {
            "name": primary,
            "title": metric_info(primary).title,
            "better": metric_info(primary).better,
        },
        "target_loss": target["value"] if target and target["name"] == "val_loss" else None,
        "target_metric": dict(target) if target else None,
        "runs": {
            "total": len(outcomes),
            "succeeded": sum(o.finished for o in outcomes),
            "partial": sum(o.partial for o in outcomes),
            "pending": sum(o.status in PENDING for o in outcomes),
        },
        "rows": rows,
        "best": best_by_column(rows, has_target),
        "winner": winner,
        "winner_text": winner_text(winner),
        "fisher": fisher,
    }


def jsonable(value: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def csv_cell(value: Any, key: str | None = None) -> str:
    """The one way result files write a value: nan/None as an empty field, floats exactly
    (shortest round-trip), the integer fields of ``server.summary_fields`` (``key``) as integers,
    booleans as true/false."""
    if key in INTEGER_FIELDS:
        return integer_cell(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def summary_csv_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of ``summary.csv`` (one row per optimizer configuration)."""
    columns: list[str] = [] if rows else ["group", "label", "optimizer"]
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    return columns, [[csv_cell(row.get(c), c) for c in columns] for row in rows]
