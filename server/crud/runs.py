"""Run lifecycle as single conditional UPDATEs: claim, heartbeat, finish, requeue.

Each transition is one ``UPDATE … WHERE <expected state>`` whose row count says whether this
caller won; that is what makes a run claimable by exactly one worker, a redelivered Celery task a
no-op, and a worker that lost its run (requeued after a stale heartbeat) unable to overwrite the
new owner's state — every write after the claim is fenced by ``attempt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, literal, or_, select, update
from sqlalchemy.orm import Session

from server.crud.jobs import lock_job, recompute_job, runs_from_specs
from server.db.clock import db_now
from server.db.models import Job, Run
from server.db.types import UTCDateTime, utcnow
from server.jobs.spec import JobSpec, SweepResult, sweep_winners
from server.jobs.status import ACTIVE, TERMINAL, RunStatus
from server.studies.orchestrate import budget_run_specs_for


@dataclass(frozen=True)
class Claim:
    run_id: int
    job_id: int
    attempt: int
    spec: dict[str, Any]


def claim_run(
    session: Session, run_id: int, *, worker: str, device: str | None, stale_after_s: float
) -> Claim | None:
    """Move the run to ``running`` if it is queued, or running with a heartbeat older than
    ``stale_after_s`` by the database's clock (``server.db.clock``).

    Returns None when another worker owns it, it already ended, it was cancelled, or it no longer
    exists — the redelivered-task case, which must do nothing.
    """
    job_id = session.scalar(select(Run.job_id).where(Run.id == run_id))
    if job_id is None or not lock_job(session, job_id):
        return None
    now = db_now(session)
    stale_before = now - timedelta(seconds=stale_after_s)
    claimable = or_(
        Run.status == RunStatus.QUEUED,
        and_(
            Run.status == RunStatus.RUNNING, or_(Run.heartbeat_at.is_(None), Run.heartbeat_at < stale_before)
        ),
    )
    result = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.cancel_requested.is_(False), claimable)
        .values(
            status=RunStatus.RUNNING,
            attempt=Run.attempt + 1,
            worker=worker[:200],
            device=device,
            heartbeat_at=now,
            started_at=func.coalesce(Run.started_at, literal(now, UTCDateTime())),
            finished_at=None,
            reason=None,
            error=None,
        )
    )
    if result.rowcount != 1:
        return None
    row = session.execute(select(Run.attempt, Run.spec).where(Run.id == run_id)).one()
    recompute_job(session, job_id)
    return Claim(run_id=run_id, job_id=job_id, attempt=row.attempt, spec=row.spec)


def heartbeat(session: Session, run_id: int, attempt: int, step: int | None) -> tuple[bool, bool]:
    """Refresh the heartbeat (and progress step); returns ``(still_owned, cancel_requested)``."""
    values: dict[str, Any] = {"heartbeat_at": db_now(session)}
    if step is not None:
        values["step"] = step
    result = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.attempt == attempt, Run.status == RunStatus.RUNNING)
        .values(**values)
    )
    if result.rowcount != 1:
        return False, True
    cancel = session.scalar(select(Run.cancel_requested).where(Run.id == run_id))
    return True, bool(cancel)


def finish_run(
    session: Session,
    claim: Claim,
    *,
    status: str,
    reason: str | None,
    final_step: int | None,
    summary: Mapping[str, Any] | None,
    error: str | None = None,
    run_seconds: float | None = None,
) -> bool:
    """Record the run's end; False when this worker no longer owns it (nothing is written)."""
    if status not in TERMINAL:
        raise ValueError(f"not a terminal status: {status!r}")
    if not lock_job(session, claim.job_id):
        return False
    values: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "error": error,
        "finished_at": utcnow(),
        "summary": dict(summary) if summary is not None else None,
    }
    if final_step is not None:
        values["step"] = final_step
    return _update_owned_run(session, claim, values, run_seconds)


def _update_owned_run(
    session: Session, claim: Claim, values: dict[str, Any], run_seconds: float | None
) -> bool:
    """Apply ``values`` only while this claim still owns the running run (fenced by attempt)."""
    if run_seconds is not None:
        values["run_seconds"] = func.coalesce(Run.run_seconds, 0.0) + run_seconds
    result = session.execute(
        update(Run)
        .where(Run.id == claim.run_id, Run.attempt == claim.attempt, Run.status == RunStatus.RUNNING)
        .values(**values)
    )
    if result.rowcount != 1:
        return False
    recompute_job(session, claim.job_id)
    return True


def add_run_seconds(session: Session, claim: Claim, seconds: float) -> None:
    """Account training time of an attempt that did not finish the run (lost or interrupted)."""
    session.execute(
        update(Run)
        .where(Run.id == claim.run_id, Run.attempt == claim.attempt)
        .values(run_seconds=func.coalesce(Run.run_seconds, 0.0) + seconds)
    )


def release_run(session: Session, claim: Claim, *, run_seconds: float | None = None) -> bool:
    """Give a run back to the queue (its worker is shutting down after a checkpoint)."""
    if not lock_job(session, claim.job_id):
        return False
    values: dict[str, Any] = {
        "status": RunStatus.QUEUED,
        "task_id": None,
        "worker": None,
        "queued_at": utcnow(),
        "error": "requeued: its worker shut down",
    }
    return _update_owned_run(session, claim, values, run_seconds)


def requeue_stale(session: Session, stale_after_s: float) -> list[int]:
    """Runs whose worker stopped heartbeating for ``stale_after_s`` (by the database's clock) go
    back to ``queued`` (or end ``cancelled`` when a cancel was pending). Returns the ids of the
    requeued runs, to be enqueued again."""
    stale_before = db_now(session) - timedelta(seconds=stale_after_s)
    candidates = session.execute(
        select(Run.id, Run.job_id).where(Run.status == RunStatus.RUNNING, Run.heartbeat_at < stale_before)
    ).all()
    requeued: list[int] = []
    for run_id, job_id in candidates:
        if not lock_job(session, job_id):
            continue
        stale = and_(Run.id == run_id, Run.status == RunStatus.RUNNING, Run.heartbeat_at < stale_before)
        now = utcnow()
        cancelled = session.execute(
            update(Run)
            .where(stale, Run.cancel_requested.is_(True))
            .values(
                status=RunStatus.CANCELLED,
                reason="cancelled (its worker was lost before it stopped)",
                finished_at=now,
            )
        ).rowcount
        moved = session.execute(
            update(Run)
            .where(stale, Run.cancel_requested.is_(False))
            .values(
                status=RunStatus.QUEUED,
                task_id=None,
                worker=None,
                queued_at=now,
                error="requeued: worker heartbeat went stale",
            )
        ).rowcount
        if moved:
            requeued.append(run_id)
        if moved or cancelled:
            recompute_job(session, job_id)
    return requeued


def unenqueued_runs(session: Session, queued_before: datetime) -> list[int]:
    """Queued runs that never got a broker message (e.g. the broker was down at submit time)."""
    return list(
        session.scalars(
            select(Run.id).where(
                Run.status == RunStatus.QUEUED, Run.task_id.is_(None), Run.queued_at < queued_before
            )
        ).all()
    )


def enqueued_runs(session: Session, queued_before: datetime) -> list[tuple[int, str, str]]:
    """``(run id, task id, queue)`` of queued runs published before ``queued_before``."""
    rows = session.execute(
        select(Run.id, Run.task_id, Run.queue).where(
            Run.status == RunStatus.QUEUED, Run.task_id.is_not(None), Run.queued_at < queued_before
        )
    ).all()
    return [(row.id, row.task_id, row.queue) for row in rows]


def set_task_id(session: Session, run_id: int, task_id: str) -> None:
    session.execute(
        update(Run).where(Run.id == run_id, Run.status == RunStatus.QUEUED).values(task_id=task_id)
    )


def run_queue(session: Session, run_id: int) -> str | None:
    return session.scalar(select(Run.queue).where(Run.id == run_id))


def run_queues(session: Session, run_ids: list[int]) -> dict[int, str]:
    """``run id → queue`` of the runs that still exist among ``run_ids``."""
    if not run_ids:
        return {}
    rows = session.execute(select(Run.id, Run.queue).where(Run.id.in_(run_ids))).all()
    return {row.id: row.queue for row in rows}


def expand_next_stage(session: Session, job_id: int) -> list[tuple[int, str]]:
    """Second stage of ``sweep_selection: first_seed`` jobs.

    When every first-stage run (all sweep points, first seed) has ended, each optimizer's best
    succeeded sweep point (lowest final validation loss, the rule of ``worker.local``) is run on
    the remaining seeds, so every optimizer gets the same tuning budget. Called inside the
    transaction that finished a run (the job row is locked), so exactly one worker creates it.
    Returns ``(run_id, queue)`` of the new runs, to publish after commit.
    """
    job = session.get(Job, job_id)
    if job is None or job.cancel_requested:
        return []
    spec_json = job.spec or {}
    if spec_json.get("sweep_selection") != "first_seed" or len(spec_json.get("seeds") or []) < 2:
        return []
    spec = JobSpec.model_validate(spec_json)
    stage_one = len(spec.expand())
    runs = list(session.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.index)).all())
    if len(runs) != stage_one or any(run.status in ACTIVE for run in runs):
        return []
    results = [
        SweepResult(
            group=(run.spec or {}).get("group", run.label),
            sweep_point=(run.spec or {}).get("sweep_point") or {},
            status=run.status,
            summary=run.summary,
        )
        for run in runs
    ]
    chosen = sweep_winners(results, spec.task.primary_metric)
    run_specs = spec.expand_selected(chosen)
    if job.study_id is not None:  # a study's baseline also runs at its larger budgets
        run_specs += budget_run_specs_for(session, job, chosen)
    new = runs_from_specs(run_specs, start_index=stage_one, auto_queue=runs[0].queue)
    for run in new:
        run.job_id = job_id
        # The first stage's stored queue: the auto-device choice made at submission (the setting
        # may have changed since) and the run size (``gpu-x4``), the same for every run of a job.
        run.queue = runs[0].queue
    session.add_all(new)
    session.flush()
    recompute_job(session, job_id)
    return [(run.id, run.queue) for run in new]
