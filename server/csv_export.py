"""Full-fidelity CSV exports streamed in constant memory.

Rows come from a server-side cursor (``yield_per``; a named cursor on PostgreSQL) in batches and
are encoded batch by batch, so a 1M-row export holds one batch in memory, never the whole result.
The files and their columns are the same as ``dykaf-lab run`` writes (``worker.local``):
``metrics.csv`` (every metric point), ``fisher.csv`` (every Fisher row), ``runs.csv`` (one row per
run, ``partial`` marking a run that stopped before its schedule ended) and ``summary.csv`` (one row
per optimizer configuration, ``server.summary``). Floats are written with ``repr`` (shortest exact
round-trip); a missing or non-finite value (NaN, which SQLite stores as NULL) is an empty field.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.crud.metrics import iter_fisher_rows, iter_metric_rows
from server.crud.summary import load_job_summary
from server.db.models import Run
from server.summary import ENDED_EARLY, csv_cell, summary_csv_rows

METRICS_HEADER = ("run_id", "label", "optimizer", "seed", "name", "step", "value", "wall_time")
FISHER_HEADER = ("run_id", "label", "optimizer", "seed", "step", "layer", "method", "metric", "value")
RUNS_FIXED = (
    "run_id",
    "index",
    "label",
    "optimizer",
    "seed",
    "status",
    "partial",
    "reason",
    "step",
    "total_steps",
    "attempt",
    "device",
    "started_at",
    "finished_at",
    "run_seconds",
    "hyperparameters",
)


def fmt_float(value: float | None) -> str:
    return "" if value is None else csv_cell(float(value))


def _encode(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _run_info(session: Session, job_id: int) -> dict[int, tuple[str, str, int]]:
    rows = session.execute(select(Run.id, Run.label, Run.optimizer, Run.seed).where(Run.job_id == job_id))
    return {rid: (label, opt, seed) for rid, label, opt, seed in rows}


def _stream(open_session: Callable[[], Session], body: Callable[[Session], Iterator[str]]) -> Iterator[str]:
    session = open_session()
    try:
        yield from body(session)
    finally:
        session.rollback()
        session.close()


def metrics_csv(open_session: Callable[[], Session], job_id: int, batch: int = 5000) -> Iterator[str]:
    def body(session: Session) -> Iterator[str]:
        info = _run_info(session, job_id)
        yield _encode([METRICS_HEADER])
        for part in iter_metric_rows(session, job_id, batch):
            out = []
            for run_id, name, step, value, wall in part:
                label, opt, seed = info[run_id]
                out.append((run_id, label, opt, seed, name, step, fmt_float(value), fmt_float(wall)))
            yield _encode(out)

    return _stream(open_session, body)


def fisher_csv(open_session: Callable[[], Session], job_id: int, batch: int = 5000) -> Iterator[str]:
    def body(session: Session) -> Iterator[str]:
        info = _run_info(session, job_id)
        yield _encode([FISHER_HEADER])
        for part in iter_fisher_rows(session, job_id, batch):
            out = []
            for run_id, step, layer, method, metric, value in part:
                label, opt, seed = info[run_id]
                out.append((run_id, label, opt, seed, step, layer, method, metric, fmt_float(value)))
            yield _encode(out)

    return _stream(open_session, body)


def runs_csv(open_session: Callable[[], Session], job_id: int) -> Iterator[str]:
    """One row per run: identity, outcome, timings, then every summary key (union over runs)."""

    def body(session: Session) -> Iterator[str]:
        runs = session.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.index)).all()
        keys = sorted({key for run in runs for key in (run.summary or {})})
        yield _encode([(*RUNS_FIXED, *keys)])
        rows = []
        for run in runs:
            summary = run.summary or {}
            hyper = json.dumps((run.spec or {}).get("hyperparameters") or {}, sort_keys=True)
            fixed = (
                run.id,
                run.index,
                run.label,
                run.optimizer,
                run.seed,
                run.status,
                csv_cell(run.status in ENDED_EARLY),
                run.reason or "",
                run.step,
                run.total_steps,
                run.attempt,
                run.device or "",
                run.started_at.isoformat() if run.started_at else "",
                run.finished_at.isoformat() if run.finished_at else "",
                fmt_float(run.run_seconds),
                hyper,
            )
            rows.append((*fixed, *(csv_cell(summary.get(key), key) for key in keys)))
        yield _encode(rows)

    return _stream(open_session, body)


def summary_csv(open_session: Callable[[], Session], job_id: int) -> Iterator[str]:
    """One row per optimizer configuration: ``server.summary``'s rows, as the JSON summary has them."""

    def body(session: Session) -> Iterator[str]:
        result = load_job_summary(session, job_id, with_fisher=False)
        header, rows = summary_csv_rows(result["rows"] if result else [])
        yield _encode([header, *rows])

    return _stream(open_session, body)
