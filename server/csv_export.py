"""Full-fidelity CSV exports streamed in constant memory.

Rows come from a server-side cursor (``yield_per``; a named cursor on PostgreSQL) in batches and
are encoded batch by batch, so a 1M-row export holds one batch in memory, never the whole result.
Floats are written with ``repr`` (shortest exact round-trip); a NaN stored as NULL by SQLite is
written as ``nan``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.crud.metrics import iter_fisher_rows, iter_metric_rows
from server.db.models import Run
from server.summary_fields import INTEGER_FIELDS, integer_cell

METRICS_HEADER = ("run_id", "label", "optimizer", "seed", "name", "step", "value", "wall_time")
FISHER_HEADER = ("run_id", "label", "optimizer", "seed", "step", "layer", "method", "metric", "value")
SUMMARY_FIXED = (
    "run_id",
    "index",
    "label",
    "optimizer",
    "seed",
    "status",
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
    if value is None:
        return "nan"
    value = float(value)
    return repr(value) if math.isfinite(value) else str(value)


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


def summary_csv(open_session: Callable[[], Session], job_id: int) -> Iterator[str]:
    """One row per run: identity, outcome, timings, then every summary key (union over runs)."""

    def body(session: Session) -> Iterator[str]:
        runs = session.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.index)).all()
        keys = sorted({key for run in runs for key in (run.summary or {})})
        yield _encode([(*SUMMARY_FIXED, *keys)])
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
                run.reason or "",
                run.step,
                run.total_steps,
                run.attempt,
                run.device or "",
                run.started_at.isoformat() if run.started_at else "",
                run.finished_at.isoformat() if run.finished_at else "",
                fmt_float(run.run_seconds) if run.run_seconds is not None else "",
                hyper,
            )
            extra = []
            for key in keys:
                value = summary.get(key)
                if key in INTEGER_FIELDS:
                    extra.append(integer_cell(value))
                else:
                    extra.append(
                        "" if value is None else fmt_float(value) if isinstance(value, float) else value
                    )
            rows.append((*fixed, *extra))
        yield _encode(rows)

    return _stream(open_session, body)
