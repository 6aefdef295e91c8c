"""Running a study with the job machinery: one job per scale, plus the baseline's budget runs.

A study is stored as a ``studies`` row and expands into one ordinary job per scale
(``StudySpec.job_spec``: the scale's task, every optimizer with its sweep, all seeds,
``sweep_selection: first_seed``). The jobs are created and published exactly like a submitted job,
so workers, the reconciler, cancellation, the job page and its CSVs all work unchanged.

How the baseline gets its larger budgets: **extra runs in the same job**, added in the transaction
that picks the sweep winners. ``server.crud.runs.expand_next_stage`` already waits for every
first-seed sweep run to end and then adds each optimizer's winner on the remaining seeds; for a
job that belongs to a study it also asks ``budget_run_specs_for`` for the baseline's winner at
2×, 4× … the steps on every seed (groups ``adamw@2x``…). A run carries its whole task, so runs with
longer schedules live in the same job without any new machinery; they are created exactly once
(the job row is locked), published with the confirmation runs, and a cancelled job stops them too.
A follow-up job would have needed a second trigger and a second place to cancel; this needs neither.

Results are never stored: ``study_report`` recomputes them from the runs on each read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from server.crud import jobs as jobs_crud
from server.db.models import Job, Run, Study
from server.db.types import utcnow
from server.studies.report import RunRecord, study_report, tokens_of
from server.studies.spec import JobSpec, StudySpec, budget_run_specs


def create_study(
    session: Session, spec: StudySpec, *, auto_queue: str = "gpu", api_key_id: int | None = None
) -> Study:
    """Insert the study and one job per scale (with their first-stage runs); the caller publishes."""
    study = Study(
        name=spec.name, spec=spec.model_dump(mode="json"), api_key_id=api_key_id, created_at=utcnow()
    )
    session.add(study)
    session.flush()
    for index in range(len(spec.scales)):
        job = jobs_crud.create_job(
            session, spec.job_spec(index), auto_queue=auto_queue, api_key_id=api_key_id
        )
        job.study_id = study.id
    session.flush()
    return study


def budget_run_specs_for(session: Session, job: Job, chosen: dict[str, dict[str, Any]]) -> list[Any]:
    """The baseline's budget runs for a study's job, given the winners just chosen (else none)."""
    if job.study_id is None:
        return []
    study = session.get(Study, job.study_id)
    if study is None:
        return []
    spec = StudySpec.model_validate(study.spec)
    job_spec = JobSpec.model_validate(job.spec)
    return budget_run_specs(job_spec, spec.baseline, chosen.get(spec.baseline, {}), spec.budgets)


def get_study(session: Session, study_id: int) -> Study | None:
    query = select(Study).where(Study.id == study_id).options(selectinload(Study.jobs).selectinload(Job.runs))
    return session.scalars(query).first()


def list_studies(session: Session, limit: int = 100) -> list[Study]:
    query = select(Study).order_by(Study.id.desc()).limit(limit).options(selectinload(Study.jobs))
    return list(session.scalars(query).all())


def study_status(jobs: Sequence[Job]) -> tuple[str, str | None]:
    """Derived from its jobs the way a job's status is derived from its runs."""
    return jobs_crud.derive_status([(j.status, j.reason, j.name) for j in jobs], False)


def run_record(run: Run) -> RunRecord:
    spec = run.spec or {}
    return RunRecord(
        group=spec.get("group", run.label),
        sweep_point=spec.get("sweep_point") or {},
        seed=run.seed,
        status=run.status,
        tokens=tokens_of(spec["task"]),
        summary=run.summary or {},
        run_seconds=run.run_seconds,
    )


def jobs_by_scale(study: Study, spec: StudySpec) -> list[Job | None]:
    """The job of each scale, in the spec's order (None where that job was deleted)."""
    by_name = {job.name: job for job in study.jobs}
    return [by_name.get(spec.job_name(index)) for index in range(len(spec.scales))]


def report_of(study: Study) -> dict[str, Any]:
    """The study's report (see ``server.studies.report``) from its jobs' stored runs."""
    spec = StudySpec.model_validate(study.spec)
    jobs = jobs_by_scale(study, spec)
    runs_by_scale = [[run_record(r) for r in job.runs] if job is not None else [] for job in jobs]
    report = study_report(spec, runs_by_scale)
    for scale, job in zip(report["scales"], jobs, strict=True):
        scale["job_id"] = None if job is None else job.id
        scale["status"] = "deleted" if job is None else job.status
    return report
