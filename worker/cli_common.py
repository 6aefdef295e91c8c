"""What both command modules of ``dykaf-lab`` use: reading a job file and the summary table."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from server.jobs.spec import JobSpec, format_validation_error, parse_job
from server.summary import TASK_METRICS

T = TypeVar("T")


def read_spec_file(
    path: Path,
    parse: Callable[[Any], T],
    format_error: Callable[[ValidationError], str],
    *,
    what: str,
    needs: str,
) -> T:
    """Parse a YAML (or JSON) spec file with ``parse``; exits 2 with a readable error. ``what`` names
    the kind of file in messages, ``needs`` the keys a mapping must at least have."""
    # Plain echo, not rich: error lines must not be re-wrapped, users grep and copy them.
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        typer.echo(f"{path}: not valid YAML\n{exc}", err=True)
        raise typer.Exit(2) from None
    if not isinstance(data, dict):
        typer.echo(f"{path}: expected a mapping with at least {needs}", err=True)
        raise typer.Exit(2)
    try:
        return parse(data)
    except ValidationError as exc:
        typer.echo(f"{path}: invalid {what} file\n{format_error(exc)}", err=True)
        raise typer.Exit(2) from None


def load_job_file(path: Path) -> JobSpec:
    """Parse a job file into a validated ``JobSpec``; exits 2 with a readable error."""
    return read_spec_file(path, parse_job, format_validation_error, what="job", needs="'optimizers'")


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std``; just the mean where the spread is undefined (one seed: std is NaN or 0)."""
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_table(rows: list[dict[str, Any]], has_target: bool) -> Table:
    table = Table(title="summary (mean ± std over seeds)")
    columns = ("optimizer", "ok/seeds", "final val loss", "best val loss", "step ms", "peak MB", "diag %")
    # Task-quality metrics (classify: accuracy, F1, MCC; instruct: exact match) when the rows have them.
    quality = [k for k in TASK_METRICS if k.startswith("final_") and any(f"{k}_mean" in r for r in rows)]
    for column in columns + tuple(k.removeprefix("final_").replace("_", " ") for k in quality):
        table.add_column(column)
    if has_target:
        table.add_column("steps to target")
        table.add_column("s to target")
    # "*" marks each optimizer's selected sweep point; without sweeps there is nothing to mark.
    swept = len({row["group"] for row in rows}) < len(rows)
    for row in rows:
        row = {k: math.nan if v is None else v for k, v in row.items()}  # null over JSON is NaN here
        if row["seeds"] == 1:  # no spread to show
            row = {k: math.nan if k.endswith("_std") else v for k, v in row.items()}
        # Means are over the runs that finished their schedule; the others are counted, not averaged.
        stopped = f" ({row['partial']} partial)" if row.get("partial") else ""
        pending = f" ({row['pending']} pending)" if row.get("pending") else ""
        cells = [
            escape(row["label"]) + (" *" if swept and row["selected"] else ""),
            f"{row['succeeded']}/{row['seeds']}{stopped}{pending}",
            _fmt(row["final_val_loss_mean"], row["final_val_loss_std"]),
            _fmt(row["best_val_loss_mean"], row["best_val_loss_std"]),
            _fmt(row["step_time_ms_mean"], row["step_time_ms_std"], 1),
            f"{row['peak_memory_mb_mean']:.0f}" if math.isfinite(row["peak_memory_mb_mean"]) else "-",
            # Fisher diagnostics' time as a share of training time (not included in the times).
            f"{100 * row['fisher_overhead_mean']:.1f}" if math.isfinite(row["fisher_overhead_mean"]) else "-",
        ]
        cells.extend(_fmt(row[f"{k}_mean"], row[f"{k}_std"]) for k in quality)
        if has_target:
            cells.append(
                f"{_fmt(row['steps_to_target_mean'], row['steps_to_target_std'], 0)} "
                f"({row.get('reached_target', 0)}/{row['seeds']})"
            )
            cells.append(_fmt(row["time_to_target_s_mean"], row["time_to_target_s_std"], 1))
        table.add_row(*cells)
    return table
