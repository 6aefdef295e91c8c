"""Run a whole comparison job in this process (``dykaf-lab run JOB.yaml``) and report it.

Writes into the output directory the same files, with the same columns, as a server's downloads
(``server.csv_export``; an empty field is a missing or non-finite value):
- ``metrics.csv`` one row per logged metric point of every run, full fidelity;
- ``fisher.csv``  Fisher diagnostic rows, when the task asks for them;
- ``runs.csv``    one row per run: status, reason, how far it got (``partial``), its summary numbers;
- ``summary.csv`` one row per optimizer configuration (``server.summary``: means over the runs that
  finished their schedule, partial runs counted apart);
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
import json
import math
import re
import shutil
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from server import palette
from server.csv_export import FISHER_HEADER, METRICS_HEADER, RUNS_FIXED
from server.jobs.spec import JobSpec, RunSpec, selection_score
from server.jobs.status import RunStatus
from server.summary import (
    ENDED_EARLY,
    RunOutcome,
    csv_cell,
    job_summary,
    row_score,
    summarize_outcomes,
    summary_csv_rows,
)
from worker import fisher_plot
from worker.distributed.folder import METRICS_FILE
from worker.distributed.launch import launch_ranks
from worker.training.runner import RunResult, execute_run
from worker.training.sinks import MemorySink, MultiSink, read_json_lines

RESULT_FILES = (
    "metrics.csv",
    "runs.csv",
    "summary.csv",
    "curves.png",
    "fisher.csv",
    "fisher.png",
    "job.json",
)


@dataclass
class RunRecord:
    spec: RunSpec
    result: RunResult
    curves: MemorySink
    run_id: int = 0  # position in the job, the ``run_id`` column of every result file


@dataclass
class JobOutcome:
    out_dir: Path
    runs: list[RunRecord]
    summary: list[dict[str, Any]]
    selected: dict[str, str] = field(default_factory=dict)  # group -> selected label
    fisher_verdict: str | None = None  # how close each method's factors sit to the floor
    winner_text: str | None = None  # the best configuration by the primary metric, in words

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.out_dir / name for name in RESULT_FILES if (self.out_dir / name).exists()}


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)[:120]


def _score(record: RunRecord) -> float:
    """The contract's sweep-selection score of a run of this process (lower wins), by the task's
    primary metric."""
    return selection_score(record.result.status, record.result.summary, record.spec.task.primary_metric)


def outcome_of(record: RunRecord) -> RunOutcome:
    spec, result = record.spec, record.result
    return RunOutcome(
        spec.label,
        spec.group,
        spec.optimizer,
        spec.sweep_point,
        result.status,
        result.summary,
        step=result.final_step,
        total_steps=spec.task.steps,
    )


def summarize(records: Sequence[RunRecord], selected: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``server.summary.summarize_outcomes`` of this process's runs."""
    has_target = bool(records) and records[0].spec.target_metric is not None
    return summarize_outcomes([outcome_of(r) for r in records], selected, has_target=has_target)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _run_rows(records: Sequence[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """``runs.csv``: the server's columns (``server.csv_export.RUNS_FIXED``) then every summary key."""
    keys = sorted({key for r in records for key in r.result.summary})
    rows = []
    for r in records:
        spec, result = r.spec, r.result
        fixed: dict[str, Any] = {
            "run_id": r.run_id,
            "index": r.run_id,
            "label": spec.label,
            "optimizer": spec.optimizer,
            "seed": spec.seed,
            "status": result.status,
            "partial": result.status in ENDED_EARLY,
            "reason": result.reason or "",
            "step": result.final_step,
            "total_steps": spec.task.steps,
            "attempt": 1,
            "hyperparameters": json.dumps(spec.hyperparameters, sort_keys=True),
        }
        rows.append(
            [csv_cell(fixed.get(c), c) for c in RUNS_FIXED]
            + [csv_cell(result.summary.get(k), k) for k in keys]
        )
    return [*RUNS_FIXED, *keys], rows


def _label_colors(records: Sequence[RunRecord]) -> dict[str, str]:
    """Each label's colour (``server.palette``: one colour per optimizer, the dashboard's)."""
    return palette.label_colors((r.spec.label, r.spec.optimizer) for r in records)


def plot_curves(records: Sequence[RunRecord], selected: dict[str, str], path: Path, title: str) -> Any:
    """Validation loss vs step and vs training seconds, train loss vs step; mean with min–max band.
    Returns the matplotlib figure (closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    labels = _selected_labels(records, selected)
    colors = _label_colors(records)
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
            ax.plot(xs, mean, label=f"{label} (n={len(runs)})", color=colors[label])
            ax.fill_between(xs, low, high, alpha=0.2, color=colors[label])
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
    return fig


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
    colors = _label_colors(records)  # as in curves.png and on the dashboard
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
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)  # nothing of an earlier run in this folder is mistaken for ours
    (out / "job.json").write_text(job.model_dump_json(indent=2), encoding="utf-8")
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
            records.append(_run_one(spec, len(records), out, device, progress, checkpoints))

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
                best = min(pool, key=lambda row: row_score(row, job.task.primary_metric))
                selected[group] = best["label"]

    target = job.target.model_dump() if job.target is not None else None
    result = job_summary(
        [outcome_of(r) for r in records], selected=selected, primary=job.task.primary_metric, target=target
    )
    _write_csv(out / "runs.csv", *_run_rows(records))
    _write_csv(out / "summary.csv", *summary_csv_rows(result["rows"]))
    plot_curves(records, selected, out / "curves.png", f"{job.name}: {job.task.kind}")
    verdict = plot_job_fisher(
        records, selected, out / "fisher.png", f"{job.name}: Fisher fidelity (mean over seeds)"
    )
    return JobOutcome(
        out_dir=out,
        runs=records,
        summary=result["rows"],
        selected=selected,
        fisher_verdict=verdict,
        winner_text=result["winner_text"],
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


class ResultCsvSink:
    """Appends one run's metric points and Fisher rows to ``metrics.csv`` / ``fisher.csv`` in the
    server's long format (``server.csv_export``), so a local result folder reads like a download."""

    def __init__(self, out: Path, run_id: int, spec: RunSpec) -> None:
        self.identity = [run_id, spec.label, spec.optimizer, spec.seed]
        self._metrics = self._open(out / "metrics.csv", METRICS_HEADER)
        self._fisher = self._open(out / "fisher.csv", FISHER_HEADER) if spec.task.fisher_every > 0 else None

    @staticmethod
    def _open(path: Path, header: Sequence[str]) -> tuple[Any, Any]:
        fresh = not path.exists() or path.stat().st_size == 0
        handle = path.open("a", newline="", encoding="utf-8")
        writer = csv.writer(handle, lineterminator="\n")
        if fresh:
            writer.writerow(header)
        return handle, writer

    def log_metrics(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None:
        self._metrics[1].writerows(
            [*self.identity, name, step, csv_cell(float(value)), csv_cell(float(wall_time))]
            for name, value in metrics.items()
        )

    def log_fisher(self, rows: Iterable[Sequence[Any]]) -> None:
        if self._fisher is not None:
            self._fisher[1].writerows([*self.identity, *row[:4], csv_cell(_float(row[4]))] for row in rows)

    def flush(self) -> None:
        for part in (self._metrics, self._fisher):
            if part is not None:
                part[0].flush()

    def close(self) -> None:
        for part in (self._metrics, self._fisher):
            if part is not None:
                part[0].close()


def rank_devices(count: int, device: str | None, spec_device: str) -> list[str]:
    """This machine's first ``count`` GPUs, or ``count`` CPU ranks for a CPU run (or one without
    CUDA); a GPU run asking for more GPUs than the machine has is refused with the numbers."""
    wanted = device or spec_device
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return [f"cpu{i}" for i in range(count)]
    available = torch.cuda.device_count()
    if available < count:
        raise ValueError(f"task.devices_per_run is {count} but this machine has {available} GPU(s)")
    return [str(i) for i in range(count)]


def _train_on_ranks(
    spec: RunSpec, sink: MultiSink, checkpoint_dir: Path, device: str | None, on_step: Any
) -> RunResult:
    """A multi-device run: torchrun-started ranks (``worker.distributed``), rank 0 writing its
    metrics to a file that is replayed into ``sink`` when they are done."""
    folder = checkpoint_dir / "launch"
    result = launch_ranks(
        spec,
        folder,
        checkpoint_dir=checkpoint_dir,
        devices=rank_devices(spec.task.devices_per_run, device, spec.device),
        progress=lambda step: on_step(step, spec.task.steps, {}),
    )
    if (folder / METRICS_FILE).exists():
        read_json_lines(folder / METRICS_FILE, sink)
    return result


def _run_one(
    spec: RunSpec, run_id: int, out: Path, device: str | None, progress: Any, checkpoints: bool
) -> RunRecord:
    csv_sink = ResultCsvSink(out, run_id, spec)
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
        if spec.task.devices_per_run > 1:
            result = _train_on_ranks(spec, sink, checkpoint_dir, device, on_step)
            if not checkpoints:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        else:
            result = execute_run(
                spec,
                sink,
                checkpoint_dir=checkpoint_dir if checkpoints else None,
                device=device,
                progress=on_step,
            )
    finally:
        csv_sink.close()
    status = result.status if result.status == RunStatus.SUCCEEDED else f"{result.status}: {result.reason}"
    progress.update(task_id, info=escape(status[:80]))
    return RunRecord(spec=spec, result=result, curves=memory, run_id=run_id)
