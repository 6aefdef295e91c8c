"""Jobs and the job-level view of their runs: create, list, cancel, rerun, delete, derived status.

Lock order everywhere is *job row, then run rows*: every transaction that changes a run's status
first touches its job row (``lock_job``). On PostgreSQL that row lock serialises the status
recomputation of one job across workers finishing runs concurrently (otherwise two of them could
each see the other's run as still running and leave the job "running" forever); on SQLite the
leading write takes the database write lock before any read, so no transaction is ever upgraded
from reader to writer mid-way.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from server.db.models import Job, Run
from server.db.types import utcnow
from server.jobs.queues import sized_queue
from server.jobs.status import ACTIVE, TERMINAL, RunStatus


def queue_for(device: str, auto_queue: str = "gpu", devices: int = 1) -> str:
    """Celery queue of a run: ``cpu`` jobs go to CPU workers, ``cuda``/``auto`` to GPU workers (the
    ``auto_queue`` family); a run on N > 1 devices to that family's ``-xN`` queue
    (``server.jobs.queues``), which only workers owning at least N devices consume."""
    if device == "cpu":
        base = "cpu"
    elif device == "cuda":
        base = "gpu"
    else:
        base = auto_queue
    return sized_queue(base, devices)


def runs_from_specs(run_specs: Sequence[Any], *, start_index: int, auto_queue: str) -> list[Run]:
    """ORM rows for ``server.jobs.spec.RunSpec`` objects (the spec is stored whole, as JSON)."""
    now = utcnow()
    return [
        Run(
            index=start_index + i,
            label=rs.label,
            optimizer=rs.optimizer,
            seed=rs.seed,
            spec=rs.model_dump(mode="json"),
            total_steps=rs.task.steps,
            queue=queue_for(rs.device, auto_queue, rs.task.devices_per_run),
            status=RunStatus.QUEUED,
            step=0,
            attempt=0,
            cancel_requested=False,
            created_at=now,
            queued_at=now,
        )
        for i, rs in enumerate(run_specs)
    ]


def create_job(
    session: Session,
    spec: Any,
    *,
    auto_queue: str = "gpu",
    api_key_id: int | None = None,
    rerun_of: int | None = None,
) -> Job:
    """Insert a job and its runs (one per optimizer × sweep point × seed of ``spec.expand()``)."""
    now = utcnow()
    job = Job(
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        status=RunStatus.QUEUED,
        cancel_requested=False,
        api_key_id=api_key_id,
        rerun_of=rerun_of,
        created_at=now,
        updated_at=now,
    )
    job.runs = runs_from_specs(spec.expand(), start_index=0, auto_queue=auto_queue)
    session.add(job)
    session.flush()
    return job


def lock_job(session: Session, job_id: int, **values: Any) -> bool:
    """Take the job's row lock (see module docstring); returns False when the job is gone."""
    result = session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow(), **values))
    return bool(result.rowcount)


def derive_status(
    statuses_reasons: Sequence[tuple[str, str | None, str]], cancel_requested: bool
) -> tuple[str, str | None]:
    """Job status and reason from its runs' ``(status, reason, label)``.

    Any run still active → ``running`` (or ``queued`` when none has started). Otherwise
    ``succeeded`` only when every run succeeded; else the most serious outcome wins
    (cancelled > failed > diverged), with a reason counting the runs and quoting the first one.
    """
    if not statuses_reasons:
        return RunStatus.QUEUED, None
    counts = Counter(status for status, _, _ in statuses_reasons)
    total = len(statuses_reasons)
    if counts[RunStatus.QUEUED] + counts[RunStatus.RUNNING]:
        started = total - counts[RunStatus.QUEUED]
        return (RunStatus.RUNNING if started else RunStatus.QUEUED), None
    if counts[RunStatus.SUCCEEDED] == total:
        return RunStatus.SUCCEEDED, None
    for status in (RunStatus.CANCELLED, RunStatus.FAILED, RunStatus.DIVERGED):
        if counts[status]:
            first = next((label, reason) for s, reason, label in statuses_reasons if s == status)
            if status == RunStatus.CANCELLED and cancel_requested:
                return (
                    RunStatus.CANCELLED,
                    f"cancelled on request ({counts[status]} of {total} runs stopped early)",
                )
            return status, f"{counts[status]} of {total} runs {status}; {first[0]}: {first[1] or status}"
    raise AssertionError(f"unexpected run statuses {dict(counts)}")  # pragma: no cover


def recompute_job(session: Session, job_id: int) -> str | None:
    """Store the job's status derived from its runs; call after ``lock_job`` in the same transaction."""
    job_row = session.execute(select(Job.cancel_requested, Job.finished_at).where(Job.id == job_id)).first()
    if job_row is None:
        return None
    rows = session.execute(
        select(Run.status, Run.reason, Run.label).where(Run.job_id == job_id).order_by(Run.index)
    ).all()
    status, reason = derive_status([tuple(r) for r in rows], job_row.cancel_requested)
    values: dict[str, Any] = {"status": status, "reason": reason}
    values["finished_at"] = (job_row.finished_at or utcnow()) if status in TERMINAL else None
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    return status


@dataclass
class RunCounts:
    by_status: dict[str, int]
    steps_done: int
    steps_total: int

    @property
    def progress(self) -> float:
        return 0.0 if self.steps_total <= 0 else min(1.0, self.steps_done / self.steps_total)


def run_counts(session: Session, job_ids: Sequence[int]) -> dict[int, RunCounts]:
    """Per-job run counts and step progress in one query.

    Progress counts the steps runs actually trained (``Run.step``), whatever their status: a run
    cancelled at 1141/5000 adds 1141, so a job that ended early says how far it got instead of 100 %.
    """
    out: dict[int, RunCounts] = {jid: RunCounts({}, 0, 0) for jid in job_ids}
    if not job_ids:
        return out
    rows = session.execute(
        select(
            Run.job_id,
            Run.status,
            func.count(),
            func.coalesce(func.sum(Run.step), 0),
            func.coalesce(func.sum(Run.total_steps), 0),
        )
        .where(Run.job_id.in_(job_ids))
        .group_by(Run.job_id, Run.status)
    ).all()
    for job_id, status, count, steps, total in rows:
        rc = out[job_id]
        rc.by_status[status] = int(count)
        rc.steps_total += int(total)
        rc.steps_done += int(steps)
    return out


def encode_cursor(job_id: int) -> str:
    return base64.urlsafe_b64encode(f"j{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Inverse of :func:`encode_cursor`; ``ValueError`` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("malformed cursor") from exc
    if not raw.startswith("j") or not raw[1:].isdigit():
        raise ValueError("malformed cursor")
    return int(raw[1:])


def list_jobs(
    session: Session,
    *,
    status: str | None = None,
    name: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> tuple[list[Job], int | None]:
    """Newest first; returns the page and the id to continue before (None on the last page)."""
    query = select(Job).order_by(Job.id.desc()).limit(limit + 1)
    if status:
        query = query.where(Job.status == status)
    if name:
        # A substring, case-insensitively; ``%``/``_`` typed by the user match themselves.
        # (Case folding is the database's ``lower``: every script on PostgreSQL, ASCII on SQLite.)
        query = query.where(Job.name.icontains(name, autoescape=True))
    if before_id is not None:
        query = query.where(Job.id < before_id)
    jobs = list(session.scalars(query).all())
    next_before = jobs[limit - 1].id if len(jobs) > limit else None
    return jobs[:limit], next_before


def get_job(session: Session, job_id: int, *, with_runs: bool = True) -> Job | None:
    query = select(Job).where(Job.id == job_id)
    if with_runs:
        query = query.options(selectinload(Job.runs))
    return session.scalars(query).first()


class JobAlreadyEnded(Exception):
    """Cancel of a job with nothing left to stop; ``status`` is the job's (terminal) status."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def request_cancel(session: Session, job_id: int) -> list[str] | None:
    """Cancel a job: queued runs end ``cancelled`` now, running ones get the flag their worker polls.

    Returns the Celery task ids of the runs that were still queued (to revoke), or None when the
    job does not exist. A job that already ended is left untouched (no flag, no ``updated_at``
    bump): ``JobAlreadyEnded``. The status test is part of the locking UPDATE, so a job that ends
    concurrently is either cancelled before it ends or refused after.
    """
    locked = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(sorted(ACTIVE)))
        .values(updated_at=utcnow(), cancel_requested=True)
    ).rowcount
    if not locked:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status is None:
            return None
        raise JobAlreadyEnded(status)
    now = utcnow()
    task_ids = [
        tid
        for tid in session.scalars(
            select(Run.task_id).where(Run.job_id == job_id, Run.status == RunStatus.QUEUED)
        ).all()
        if tid
    ]
    session.execute(
        update(Run)
        .where(Run.job_id == job_id, Run.status == RunStatus.QUEUED)
        .values(
            status=RunStatus.CANCELLED,
            reason="cancelled before it started",
            cancel_requested=True,
            finished_at=now,
        )
    )
    session.execute(
        update(Run).where(Run.job_id == job_id, Run.status == RunStatus.RUNNING).values(cancel_requested=True)
    )
    recompute_job(session, job_id)
    return task_ids


def has_active_runs(session: Session, job_id: int) -> bool:
    return bool(
        session.scalar(select(func.count()).where(Run.job_id == job_id, Run.status.in_(sorted(ACTIVE))))
    )


def delete_job(session: Session, job_id: int) -> bool:
    """Delete a finished job with its runs, metrics and Fisher rows (FK cascades)."""
    job = session.get(Job, job_id)
    if job is None:
        return False
    session.delete(job)
    session.flush()
    return True


def job_updated_marker(session: Session, job_id: int) -> tuple[str, datetime | None] | None:
    """(status, updated_at) of a job, cheap enough to key read caches on."""
    row = session.execute(select(Job.status, Job.updated_at).where(Job.id == job_id)).first()
    return None if row is None else (row.status, row.updated_at)
