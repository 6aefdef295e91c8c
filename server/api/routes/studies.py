"""Study endpoints: submit (one job per scale), list, inspect with the live report, study.csv."""

from __future__ import annotations

import csv
import io
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Response
from sqlalchemy.orm import Session

from server.api.deps import DB_INT_MAX, get_session, get_settings
from server.api.routes.jobs import API_PREFIX, check_devices, check_limits
from server.auth import read_access, require_key
from server.core.config import Settings
from server.db.models import ApiKey, Study
from server.errors import ApiError
from server.jobs.publish import publish_runs
from server.schemas import StudyJobOut, StudyOut, StudySummaryOut
from server.studies import orchestrate
from server.studies.report import CSV_COLUMNS, csv_rows
from server.studies.spec import StudySpec

router = APIRouter(prefix="/studies", tags=["studies"])
StudyId = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="study id")]


def _summary(study: Study) -> StudySummaryOut:
    spec = StudySpec.model_validate(study.spec)
    jobs = orchestrate.jobs_by_scale(study, spec)
    status, reason = orchestrate.study_status([job for job in jobs if job is not None])
    return StudySummaryOut(
        id=study.id,
        name=study.name,
        status=status,
        reason=reason,
        created_at=study.created_at,
        jobs=[
            StudyJobOut(id=j.id, scale=scale.name, name=j.name, status=j.status, reason=j.reason)
            for scale, j in zip(spec.scales, jobs, strict=True)
            if j is not None
        ],
    )


def study_detail(study: Study, warnings: list[str] | None = None) -> StudyOut:
    report = orchestrate.report_of(study)
    base = f"{API_PREFIX}/studies/{study.id}"
    return StudyOut(
        **_summary(study).model_dump(),
        spec=study.spec,
        report=report,
        links={"self": base, "study_csv": f"{base}/study.csv", "page": f"/studies/{study.id}"},
        warnings=[*(warnings or []), *report["warnings"]],
    )


def _check_limits(session: Session, spec: StudySpec, settings: Settings) -> None:
    """The deployment's job caps apply to each scale's job, the baseline's budget runs included,
    and so does the check that some worker offers the devices its runs need."""
    extra = len(spec.budgets) * len(spec.seeds)
    for index in range(len(spec.scales)):
        job = spec.job_spec(index)
        check_limits(job, settings)
        check_devices(session, settings, job, loc=("body", "scales", index, "task", "devices_per_run"))
        if job.run_count() + extra > settings.max_runs_per_job:
            raise ApiError(
                422,
                f"scales.{index}: {job.run_count() + extra} runs with the baseline's budget runs; this "
                f"server's limit is {settings.max_runs_per_job}",
                loc=["body", "optimizers"],
                type_="too_many_runs",
            )


def _get(session: Session, study_id: int) -> Study:
    study = orchestrate.get_study(session, study_id)
    if study is None:
        raise ApiError(404, f"study {study_id} not found", loc=["path", "study_id"], type_="not_found")
    return study


@router.post("", status_code=201, response_model=StudyOut, summary="Submit a study (one job per scale)")
def create_study(
    response: Response,
    spec: Annotated[StudySpec, Body(description="the study spec (same schema as `dykaf-lab study submit`)")],
    key: Annotated[ApiKey, Depends(require_key)],
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> StudyOut:
    _check_limits(session, spec, settings)
    study = orchestrate.create_study(session, spec, auto_queue=settings.auto_queue, api_key_id=key.id)
    session.commit()
    study_id = study.id
    runs = [(run.id, run.queue) for job in study.jobs for run in job.runs]
    warnings = publish_runs(settings, runs).warnings()
    response.headers["Location"] = f"{API_PREFIX}/studies/{study_id}"
    session.expire_all()
    return study_detail(_get(session, study_id), warnings)


@router.get(
    "",
    response_model=list[StudySummaryOut],
    dependencies=[Depends(read_access)],
    summary="List studies, newest first",
)
def list_studies(session: Annotated[Session, Depends(get_session)]) -> list[StudySummaryOut]:
    return [_summary(study) for study in orchestrate.list_studies(session)]


@router.get(
    "/{study_id}",
    response_model=StudyOut,
    dependencies=[Depends(read_access)],
    summary="A study with its jobs and its report (winners, edge flags, speed-ups)",
)
def get_study(study_id: StudyId, session: Annotated[Session, Depends(get_session)]) -> StudyOut:
    return study_detail(_get(session, study_id))


@router.get(
    "/{study_id}/study.csv",
    dependencies=[Depends(read_access)],
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "one row per scale x optimizer"}},
    summary="study.csv: scale, optimizer, winner, final loss mean and std, token and time speed-ups",
)
def get_study_csv(study_id: StudyId, session: Annotated[Session, Depends(get_session)]) -> Response:
    report = orchestrate.report_of(_get(session, study_id))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_rows(report))
    return Response(
        buffer.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="study-{study_id}.csv"'},
    )
