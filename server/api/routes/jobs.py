"""Job endpoints: submit, list, inspect, cancel, rerun, delete."""

from __future__ import annotations

import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session

from server.api.deps import JobId, get_session, get_settings
from server.auth import read_access, require_key
from server.core.config import Settings
from server.crud import jobs as jobs_crud
from server.crud import summary as summary_crud
from server.crud import workers as workers_crud
from server.db.models import ApiKey, Job, Run
from server.errors import ApiError
from server.jobs.publish import publish_runs, revoke
from server.jobs.spec import JobSpec
from server.jobs.status import STATUSES, TERMINAL
from server.observability import JOBS_SUBMITTED
from server.schemas import JobOut, JobPage, JobSummaryOut, Progress, RunOut
from server.summary import jsonable

router = APIRouter(prefix="/jobs", tags=["jobs"])

API_PREFIX = "/api/v1"


def _progress(counts: jobs_crud.RunCounts) -> Progress:
    return Progress(
        fraction=round(counts.progress, 6),
        steps_done=counts.steps_done,
        steps_total=counts.steps_total,
        runs=counts.by_status,
    )


def job_summary(job: Job, counts: jobs_crud.RunCounts, winner: dict[str, Any] | None = None) -> JobSummaryOut:
    return JobSummaryOut(
        id=job.id,
        name=job.name,
        status=job.status,
        reason=job.reason,
        cancel_requested=job.cancel_requested,
        rerun_of=job.rerun_of,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        progress=_progress(counts),
        winner=jsonable(winner),
    )


def run_out(run: Run) -> RunOut:
    spec = run.spec or {}
    return RunOut(
        id=run.id,
        index=run.index,
        label=run.label,
        optimizer=run.optimizer,
        seed=run.seed,
        status=run.status,
        reason=run.reason,
        step=run.step,
        total_steps=run.total_steps,
        attempt=run.attempt,
        worker=run.worker,
        device=run.device,
        queue=run.queue,
        cancel_requested=run.cancel_requested,
        heartbeat_at=run.heartbeat_at,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        run_seconds=run.run_seconds,
        hyperparameters=spec.get("hyperparameters") or {},
        sweep_point=spec.get("sweep_point") or {},
        summary=run.summary,
    )


def counts_of(runs: list[Run]) -> jobs_crud.RunCounts:
    """Run counts of loaded runs, without a query (steps actually trained, as ``run_counts``)."""
    counts = jobs_crud.RunCounts({}, 0, 0)
    for run in runs:
        counts.by_status[run.status] = counts.by_status.get(run.status, 0) + 1
        counts.steps_total += run.total_steps
        counts.steps_done += run.step
    return counts


def job_detail(session: Session, job: Job, warnings: list[str] | None = None) -> JobOut:
    counts = counts_of(list(job.runs))
    winner = summary_crud.winner_of(list(job.runs)) if job.status in TERMINAL else None
    base = f"{API_PREFIX}/jobs/{job.id}"
    return JobOut(
        **job_summary(job, counts, winner).model_dump(),
        spec=job.spec,
        runs=[run_out(run) for run in job.runs],
        links={
            "self": base,
            "metrics": f"{base}/metrics",
            "metrics_csv": f"{base}/metrics.csv",
            "summary": f"{base}/summary",
            "summary_csv": f"{base}/summary.csv",
            "runs_csv": f"{base}/runs.csv",
            "fisher": f"{base}/fisher",
            "fisher_csv": f"{base}/fisher.csv",
        },
        warnings=warnings or [],
    )


def check_limits(spec: JobSpec, settings: Settings) -> None:
    """Deployment caps on top of the schema's own (``DYKAF_MAX_RUNS_PER_JOB``)."""
    runs = spec.run_count()
    if runs > settings.max_runs_per_job:
        raise ApiError(
            422,
            f"the job expands to {runs} runs (optimizers x sweep points x seeds); this server's limit is "
            f"{settings.max_runs_per_job}",
            loc=["body", "optimizers"],
            type_="too_many_runs",
        )


# The kind of worker a job's device needs; "auto" runs on whichever worker consumes its queue.
WORKER_KIND = {"cuda": "cuda", "cpu": "cpu", "auto": None}


def check_devices(
    session: Session,
    settings: Settings,
    spec: JobSpec,
    loc: tuple[str | int, ...] = ("body", "task", "devices_per_run"),
) -> None:
    """Refuse a job whose runs need more devices than any worker offers (422, nothing created).

    A one-device job is always accepted: it waits in its queue for a worker. A run on N > 1
    devices goes to a ``-xN`` queue that only a worker owning N devices consumes, so without one
    it would wait forever; the limit is ``DYKAF_MAX_DEVICES_PER_RUN`` when set, else the largest
    offer of a matching worker seen within ``DYKAF_WORKER_SEEN_S`` (``server.crud.workers``).
    """
    wanted = spec.task.devices_per_run
    if wanted <= 1:
        return
    kind = WORKER_KIND[spec.device]
    if settings.max_devices_per_run is not None:
        limit = settings.max_devices_per_run
        offer = f"this server's limit DYKAF_MAX_DEVICES_PER_RUN is {limit}"
    else:
        limit = workers_crud.largest_offer(session, kind, settings.worker_seen_s)
        scope = f" for device {kind}" if kind else ""
        window = f"in the last {settings.worker_seen_s:g} s"
        if limit:
            offer = f"the largest offer of a worker{scope} seen {window} is {limit} devices"
        else:
            offer = f"no worker registered{scope} {window}"
    if wanted <= limit:
        return
    starts = {
        "cuda": f"`dykaf-lab worker --gpus 0-{wanted - 1}`",
        "cpu": f"`dykaf-lab worker --cpus {wanted}`",
    }
    how = starts[kind] if kind else " or ".join(starts.values())
    raise ApiError(
        422,
        f"task.devices_per_run is {wanted} but {offer}: start a worker that owns {wanted} devices "
        f"({how}), or set DYKAF_MAX_DEVICES_PER_RUN if such workers come and go",
        loc=list(loc),
        type_="devices_unavailable",
    )


def submit(
    session: Session,
    settings: Settings,
    spec: JobSpec,
    *,
    api_key_id: int | None,
    rerun_of: int | None = None,
) -> tuple[Job, list[str]]:
    job = jobs_crud.create_job(
        session, spec, auto_queue=settings.auto_queue, api_key_id=api_key_id, rerun_of=rerun_of
    )
    session.commit()
    warnings = publish_runs(settings, [(run.id, run.queue) for run in job.runs]).warnings()
    JOBS_SUBMITTED.inc()
    return job, warnings


def _get_job(session: Session, job_id: int) -> Job:
    job = jobs_crud.get_job(session, job_id)
    if job is None:
        raise ApiError(404, f"job {job_id} not found", loc=["path", "job_id"], type_="not_found")
    return job


@router.post("", status_code=201, response_model=JobOut, summary="Submit a comparison job")
def create_job(
    response: Response,
    spec: Annotated[JobSpec, Body(description="the job spec (same schema as `dykaf-lab run` YAML)")],
    key: Annotated[ApiKey, Depends(require_key)],
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> JobOut:
    check_limits(spec, settings)
    check_devices(session, settings, spec)
    job, warnings = submit(session, settings, spec, api_key_id=key.id)
    response.headers["Location"] = f"{API_PREFIX}/jobs/{job.id}"
    return job_detail(session, job, warnings)  # the rows just written, no reload


@router.get(
    "", response_model=JobPage, dependencies=[Depends(read_access)], summary="List jobs, newest first"
)
def list_jobs(
    session: Annotated[Session, Depends(get_session)],
    status: Annotated[str | None, Query(description=f"one of {', '.join(STATUSES)}")] = None,
    name: Annotated[
        str | None, Query(max_length=200, description="part of the job name, in any letter case")
    ] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobPage:
    if status is not None and status not in STATUSES:
        raise ApiError(422, f"status must be one of {', '.join(STATUSES)}", loc=["query", "status"])
    before = None
    if cursor:
        try:
            before = jobs_crud.decode_cursor(cursor)
        except ValueError:
            raise ApiError(422, "malformed cursor", loc=["query", "cursor"]) from None
    jobs, next_before = jobs_crud.list_jobs(session, status=status, name=name, before_id=before, limit=limit)
    counts = jobs_crud.run_counts(session, [job.id for job in jobs])
    winners = summary_crud.winners(session, [job.id for job in jobs if job.status in TERMINAL])
    return JobPage(
        items=[job_summary(job, counts[job.id], winners.get(job.id)) for job in jobs],
        next_cursor=jobs_crud.encode_cursor(next_before) if next_before is not None else None,
    )


@router.get(
    "/{job_id}",
    response_model=JobOut,
    dependencies=[Depends(read_access)],
    summary="A job with its runs, progress and summaries",
)
def get_job(job_id: JobId, session: Annotated[Session, Depends(get_session)]) -> JobOut:
    return job_detail(session, _get_job(session, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job (its runs keep their data)",
    responses={409: {"description": "the job already ended; nothing was changed"}},
)
def cancel_job(
    job_id: JobId,
    _key: Annotated[ApiKey, Depends(require_key)],
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> JobOut:
    """Queued runs end now, running ones stop at their next step. A job that already ended is
    answered 409 and left exactly as it was (no flag set, ``updated_at`` unchanged)."""
    try:
        task_ids = jobs_crud.request_cancel(session, job_id)
    except jobs_crud.JobAlreadyEnded as ended:
        session.rollback()
        raise ApiError(
            409,
            f"job {job_id} already ended ({ended.status}); there is nothing to cancel",
            loc=["path", "job_id"],
            type_="conflict",
        ) from None
    if task_ids is None:
        raise ApiError(404, f"job {job_id} not found", loc=["path", "job_id"], type_="not_found")
    session.commit()
    revoke(settings, task_ids)
    session.expire_all()
    return job_detail(session, _get_job(session, job_id))


@router.post(
    "/{job_id}/rerun", status_code=201, response_model=JobOut, summary="Submit a new job with the same spec"
)
def rerun_job(
    job_id: JobId,
    response: Response,
    key: Annotated[ApiKey, Depends(require_key)],
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> JobOut:
    original = _get_job(session, job_id)
    try:  # re-validated: limits or data roots may have changed since the original submission
        spec = JobSpec.model_validate(original.spec)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("spec", *err["loc"])} for err in exc.errors(include_url=False)]
        ) from None
    check_limits(spec, settings)
    check_devices(session, settings, spec, loc=("spec", "task", "devices_per_run"))
    job, warnings = submit(session, settings, spec, api_key_id=key.id, rerun_of=job_id)
    response.headers["Location"] = f"{API_PREFIX}/jobs/{job.id}"
    session.expire_all()
    return job_detail(session, _get_job(session, job.id), warnings)


@router.delete("/{job_id}", status_code=204, summary="Delete a finished job and all its data")
def delete_job(
    job_id: JobId,
    request: Request,
    _key: Annotated[ApiKey, Depends(require_key)],
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Response:
    _get_job(session, job_id)
    if jobs_crud.has_active_runs(session, job_id):
        raise ApiError(
            409,
            f"job {job_id} still has queued or running runs; cancel it first",
            loc=["path", "job_id"],
            type_="conflict",
        )
    run_ids = [run_id for (run_id,) in session.query(Run.id).filter(Run.job_id == job_id).all()]
    jobs_crud.delete_job(session, job_id)
    session.commit()
    _remove_checkpoints(settings, run_ids)
    cache: Any = getattr(request.app.state, "read_cache", None)
    if cache is not None:
        cache.invalidate(job_id)
    return Response(status_code=204)


def _remove_checkpoints(settings: Settings, run_ids: list[int]) -> None:
    for run_id in run_ids:
        shutil.rmtree(settings.checkpoint_root / str(run_id), ignore_errors=True)
