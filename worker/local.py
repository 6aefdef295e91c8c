"""Run a whole comparison job in this process (``dykaf-lab run JOB.yaml``) and report it.

Writes into the output directory:
- ``steps.csv``   one row per logged step of every run (metrics in columns), full fidelity;
- ``fisher.csv``  Fisher diagnostic rows, when the task asks for them;
- ``runs.csv``    one row per run: status, reason, and its summary numbers;
- ``summary.csv`` one row per optimizer configuration, aggregated over seeds (mean ± std);
- ``curves.png``  validation loss against steps and against training seconds, train loss against
  steps (mean over seeds with a min–max band), one line per optimizer at its selected sweep point;
- ``fisher.png``  the Fisher-fidelity charts of the dashboard, when there are diagnostics
  (``worker.fisher_plot``);
- ``job.json``    the validated job as run, for reproducibility;
- ``checkpoints/<run>/`` the final checkpoint (and ``model.pt`` of pre-training runs).

With ``sweep_selection: first_seed`` the sweep runs on the first seed, each optimizer's best point
(lowest final validation loss; diverged runs lose) is selected, and only that point runs on the other
seeds, so every optimizer gets the same tuning budget.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from worker import fisher_plot
from worker.spec import JobSpec, RunSpec
from worker.training.runner import RunResult, execute_run
from worker.training.sinks import CsvSink, MemorySink, MultiSink

RUN_COLUMNS = ("run_key", "group", "label", "optimizer", "seed")
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
    "optimizer_share",
    "peak_memory_mb",
    "fisher_overhead",
)


@dataclass
class RunRecord:
    spec: RunSpec
    result: RunResult
    curves: MemorySink


@dataclass
class JobOutcome:
    out_dir: Path
    runs: list[RunRecord]
    summary: list[dict[str, Any]]
    selected: dict[str, str] = field(default_factory=dict)  # group -> selected label
    fisher_verdict: str | None = None  # how close each method's factors sit to the floor

    @property
    def files(self) -> dict[str, Path]:
        names = ("steps.csv", "runs.csv", "summary.csv", "curves.png", "fisher.csv", "fisher.png", "job.json")
        return {name: self.out_dir / name for name in names if (self.out_dir / name).exists()}


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)[:120]


def _score(record: RunRecord) -> float:
    """Selection score: final validation loss of a run that finished, +inf otherwise."""
    value = record.result.summary.get("final_val_loss", math.nan)
    return value if record.result.status == "succeeded" and math.isfinite(value) else math.inf


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


@dataclass(frozen=True)
class RunOutcome:
    """What the summary needs of one run, wherever it ran (this process, or a server's job JSON)."""

    label: str
    group: str
    optimizer: str
    sweep_point: dict[str, Any]
    status: str
    summary: dict[str, float]

    @classmethod
    def of(cls, record: RunRecord) -> RunOutcome:
        spec, result = record.spec, record.result
        return cls(spec.label, spec.group, spec.optimizer, spec.sweep_point, result.status, result.summary)


def summarize(records: Sequence[RunRecord], selected: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``summarize_outcomes`` of this process's runs."""
    has_target = bool(records) and records[0].spec.target_loss is not None
    return summarize_outcomes([RunOutcome.of(r) for r in records], selected, has_target)


def summarize_outcomes(
    outcomes: Sequence[RunOutcome], selected: dict[str, str] | None, has_target: bool
) -> list[dict[str, Any]]:
    """One row per label (optimizer configuration): counts, and mean/std over seeds of each metric.

    Loss statistics use the runs that succeeded; steps/seconds to target use the runs that reached it.
    ``selected`` (group → label) marks each group's selected sweep point; without it every label is.
    """
    by_label: dict[str, list[RunOutcome]] = defaultdict(list)
    for outcome in outcomes:
        by_label[outcome.label].append(outcome)
    selected = selected or {}
    rows = []
    for label, group in by_label.items():
        first = group[0]
        ok = [r for r in group if r.status == "succeeded"]
        row: dict[str, Any] = {
            "group": first.group,
            "label": label,
            "optimizer": first.optimizer,
            "sweep_point": ";".join(f"{k}={v}" for k, v in sorted(first.sweep_point.items())),
            "selected": selected.get(first.group, label) == label,
            "seeds": len(group),
            "succeeded": len(ok),
            "diverged": sum(r.status == "diverged" for r in group),
            "failed": sum(r.status in {"failed", "cancelled"} for r in group),
        }
        if has_target:
            row["reached_target"] = sum(r.summary.get("reached_target", 0.0) == 1.0 for r in group)
        for metric in SUMMARY_METRICS:
            pool = ok if metric.endswith("loss") else group
            values = [r.summary[metric] for r in pool if metric in r.summary]
            mean, std = _mean_std(values)
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def _run_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        row: dict[str, Any] = {c: getattr(r.spec, c) for c in RUN_COLUMNS}
        row.update(status=r.result.status, reason=r.result.reason or "", final_step=r.result.final_step)
        row.update(r.result.summary)
        rows.append(row)
    return rows


def plot_curves(records: Sequence[RunRecord], selected: dict[str, str], path: Path, title: str) -> None:
    """Validation loss vs step and vs training seconds, train loss vs step; mean with min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    labels = _selected_labels(records, selected)
    for label in labels:
        runs = [r for r in records if r.spec.label == label]
        for ax, metric, x_of in (
            (axes[0], "val_loss", "step"),
            (axes[1], "val_loss", "time"),
            (axes[2], "train_loss", "step"),
        ):
            per_x: dict[float, list[float]] = defaultdict(list)
            times: dict[int, list[float]] = defaultdict(list)
            for run in runs:
                for step, metrics, _ in run.curves.records:
                    if metric in metrics and math.isfinite(metrics[metric]):
                        per_x[step].append(metrics[metric])
                        times[step].append(metrics.get("train_time", math.nan))
            if not per_x:
                continue
            steps = sorted(per_x)
            mean = [statistics.fmean(per_x[s]) for s in steps]
            low = [min(per_x[s]) for s in steps]
            high = [max(per_x[s]) for s in steps]
            xs = steps if x_of == "step" else [statistics.fmean(times[s]) for s in steps]
            ax.plot(xs, mean, label=f"{label} (n={len(runs)})")
            ax.fill_between(xs, low, high, alpha=0.2)
    axes[0].set(xlabel="step", ylabel="validation loss", title="validation loss")
    axes[1].set(xlabel="training time (s)", ylabel="validation loss", title="validation loss vs time")
    axes[2].set(xlabel="step", ylabel="train loss", title="train loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _selected_labels(records: Sequence[RunRecord], selected: dict[str, str]) -> list[str]:
    """Labels of the selected sweep points, in the order they ran (the plots' colour order)."""
    return [label for label in dict.fromkeys(r.spec.label for r in records) if label in selected.values()]


def plot_job_fisher(
    records: Sequence[RunRecord], selected: dict[str, str], path: Path, title: str
) -> str | None:
    """``fisher.png`` (``worker.fisher_plot``) for the selected configurations; none without rows.
    Returns the verdict line (``fisher_plot.fisher_verdict``) when there is one."""
    path.unlink(missing_ok=True)
    labels = _selected_labels(records, selected)
    rows = {lb: [row for r in records if r.spec.label == lb for row in r.curves.fisher] for lb in labels}
    means = fisher_plot.fisher_means(rows)
    if not means:
        return None
    optimizers = {r.spec.label: r.spec.optimizer for r in records}
    label = fisher_plot.stream_label([lb for lb in labels if rows[lb]], optimizers)
    colors = {lb: f"C{i}" for i, lb in enumerate(labels)}  # the default cycle, as in curves.png
    verdict = fisher_plot.fisher_verdict(means, label)
    fisher_plot.plot_fisher(means, label, colors, path, title, verdict)
    return verdict


def run_job(
    job: JobSpec,
    out_dir: str | Path,
    *,
    device: str | None = None,
    show_progress: bool = True,
    console: Any | None = None,
    checkpoints: bool = True,
) -> JobOutcome:
    """Run every run of ``job`` sequentially and write the CSVs and the plot into ``out_dir``.

    ``checkpoints=False`` skips checkpoint files (and the ``model.pt`` exports) entirely.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(job.model_dump_json(indent=2), encoding="utf-8")
    for name in ("steps.csv", "fisher.csv"):
        (out / name).unlink(missing_ok=True)
    console = console or Console(stderr=True)
    records: list[RunRecord] = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
    )

    def run_all(specs: list[RunSpec]) -> None:
        for spec in specs:
            records.append(_run_one(spec, out, device, progress, checkpoints))

    with progress:
        run_all(job.expand())
        selected = {}
        for group in dict.fromkeys(r.spec.group for r in records):
            candidates = [r for r in records if r.spec.group == group]
            selected[group] = min(candidates, key=_score).spec.label
        if job.sweep_selection == "first_seed" and len(job.seeds) > 1:
            chosen = {
                group: next(r.spec.sweep_point for r in records if r.spec.label == label)
                for group, label in selected.items()
            }
            run_all(job.expand_selected(chosen))
        elif any(len(opt.sweep_points()) > 1 for opt in job.optimizers):
            # Every point ran on every seed: select by the mean over seeds; a point that diverged or
            # failed on any seed is not eligible (its mean would hide the failure).
            rows = summarize(records)
            for group in selected:
                pool = [row for row in rows if row["group"] == group]
                best = min(pool, key=_row_score)
                selected[group] = best["label"]

    summary = summarize(records, selected)
    _write_csv(out / "runs.csv", _run_rows(records))
    _write_csv(out / "summary.csv", summary)
    plot_curves(records, selected, out / "curves.png", f"{job.name}: {job.task.kind}")
    verdict = plot_job_fisher(
        records, selected, out / "fisher.png", f"{job.name}: Fisher fidelity (mean over seeds)"
    )
    return JobOutcome(out_dir=out, runs=records, summary=summary, selected=selected, fisher_verdict=verdict)


def _row_score(row: dict[str, Any]) -> float:
    value = row["final_val_loss_mean"]
    return value if row["succeeded"] == row["seeds"] and math.isfinite(value) else math.inf


def _run_one(spec: RunSpec, out: Path, device: str | None, progress: Any, checkpoints: bool) -> RunRecord:
    static = {c: getattr(spec, c) for c in RUN_COLUMNS}
    fisher_path = out / "fisher.csv" if spec.task.fisher_every > 0 else None
    csv_sink = CsvSink(out / "steps.csv", fisher_path=fisher_path, static=static)
    memory = MemorySink()
    checkpoint_dir = out / "checkpoints" / safe_name(spec.run_key)
    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)  # a local run always starts fresh; the service resumes
    task_id = progress.add_task(escape(spec.run_key), total=spec.task.steps, info="")

    def on_step(step: int, total: int, metrics: Any) -> None:
        info = f"loss {metrics['train_loss']:.3f}" if "train_loss" in metrics else ""
        if "val_loss" in metrics:
            info += f" val {metrics['val_loss']:.3f}"
        progress.update(task_id, completed=step, info=info)

    sink = MultiSink(csv_sink, memory)
    try:
        result = execute_run(
            spec,
            sink,
            checkpoint_dir=checkpoint_dir if checkpoints else None,
            device=device,
            progress=on_step,
        )
    finally:
        csv_sink.close()
    status = result.status if result.status == "succeeded" else f"{result.status}: {result.reason}"
    progress.update(task_id, info=escape(status[:80]))
    return RunRecord(spec=spec, result=result, curves=memory)
