"""A job's summary (``server.summary``) from its stored runs and Fisher rows."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from server.db.models import FisherValue, Job, Run
from server.summary import RunOutcome, job_summary, primary_of, target_of

VERDICT_METRIC = "kron_rel_err"  # the Fisher verdict compares Kronecker estimates with the floor


def run_outcomes(runs: list[Run]) -> list[RunOutcome]:
    outcomes = []
    for run in runs:
        spec = run.spec or {}
        outcomes.append(
            RunOutcome(
                label=run.label,
                group=spec.get("group") or run.label,
                optimizer=run.optimizer,
                sweep_point=spec.get("sweep_point") or {},
                status=run.status,
                summary=run.summary,
                step=run.step,
                total_steps=run.total_steps,
            )
        )
    return outcomes


def verdict_rows(session: Session, job_id: int) -> dict[str, list[tuple[Any, ...]]]:
    """Per run label, the ``(step, layer, method, metric, value)`` rows the Fisher verdict uses."""
    query = (
        select(
            Run.label,
            FisherValue.step,
            FisherValue.layer,
            FisherValue.method,
            FisherValue.metric,
            FisherValue.value,
        )
        .join(Run, and_(Run.id == FisherValue.run_id, Run.job_id == job_id))
        .where(FisherValue.metric == VERDICT_METRIC)
    )
    rows: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for label, *row in session.execute(query):
        rows[label].append(tuple(row))
    return rows


def load_job_summary(session: Session, job_id: int, *, with_fisher: bool = True) -> dict[str, Any] | None:
    """``server.summary.job_summary`` of a stored job, or None when it does not exist."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    runs = list(session.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.index)).all())
    result = job_summary(
        run_outcomes(runs),
        primary=primary_of(job.spec),
        target=target_of(job.spec),
        fisher_rows=verdict_rows(session, job_id) if with_fisher else None,
    )
    return {"job_id": job_id, "status": job.status, **result}


def winners(session: Session, job_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Each given job's winner (``server.summary.pick_winner``) in one query over their runs; jobs
    without one are absent. Meant for ended jobs (a running one has no winner yet)."""
    if not job_ids:
        return {}
    runs_by_job: dict[int, list[Run]] = defaultdict(list)
    for run in session.scalars(select(Run).where(Run.job_id.in_(job_ids)).order_by(Run.job_id, Run.index)):
        runs_by_job[run.job_id].append(run)
    out = {}
    for job_id, runs in runs_by_job.items():
        winner = winner_of(runs)
        if winner is not None:
            out[job_id] = winner
    return out


def winner_of(runs: list[Run]) -> dict[str, Any] | None:
    """The winner among loaded runs (None while any is pending or when one failed)."""
    spec = runs[0].job.spec if runs else None
    return job_summary(run_outcomes(runs), primary=primary_of(spec))["winner"]
