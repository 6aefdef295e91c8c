"""Metric and Fisher reads: downsampled JSON for charts, full-fidelity CSV streams for papers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.api.deps import DB_INT_MAX, JobId, RunIdItem, get_session, get_settings
from server.auth import read_access
from server.cache import ReadCache
from server.core.config import Settings
from server.crud import jobs as jobs_crud
from server.crud import metrics as metrics_crud
from server.crud.summary import load_job_summary
from server.csv_export import fisher_csv, metrics_csv, runs_csv, summary_csv
from server.db.models import Run
from server.db.session import session_factory
from server.errors import ApiError
from server.jobs.status import TERMINAL
from server.schemas import FisherOut, JobResultsOut, MetricsOut
from server.summary import jsonable

# A running job's read is kept at least this many times as long as it took to aggregate.
LIVE_COST_FACTOR = 10.0

router = APIRouter(prefix="/jobs/{job_id}", tags=["metrics"], dependencies=[Depends(read_access)])


def _marker(session: Session, job_id: int) -> tuple[str, object]:
    marker = jobs_crud.job_updated_marker(session, job_id)
    if marker is None:
        raise ApiError(404, f"job {job_id} not found", loc=["path", "job_id"], type_="not_found")
    return marker


def _runs(session: Session, job_id: int) -> dict[int, tuple[str, int]]:
    rows = session.execute(select(Run.id, Run.label, Run.seed).where(Run.job_id == job_id))
    return {rid: (label, seed) for rid, label, seed in rows}


@router.get(
    "/metrics", response_model=MetricsOut, summary="Downsampled metric series (per run and across seeds)"
)
def get_metrics(
    job_id: JobId,
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
    run_id: Annotated[
        list[RunIdItem] | None, Query(description="restrict to these runs (repeatable)")
    ] = None,
    name: Annotated[list[str] | None, Query(description="restrict to these metrics (repeatable)")] = None,
    step_min: Annotated[int | None, Query(ge=0, le=DB_INT_MAX)] = None,
    step_max: Annotated[int | None, Query(ge=0, le=DB_INT_MAX)] = None,
    max_points: Annotated[int | None, Query(ge=1, description="buckets per series (server caps it)")] = None,
    view: Annotated[
        Literal["runs", "aggregate", "both"],
        Query(description="per-run series, per-label aggregates across seeds (mean/min/max/std), or both"),
    ] = "both",
) -> Response:
    if step_min is not None and step_max is not None and step_min > step_max:
        raise ApiError(422, "step_min must not exceed step_max", loc=["query", "step_min"])
    if max_points is not None and max_points > settings.max_points_per_series:
        raise ApiError(
            422, f"max_points must be at most {settings.max_points_per_series}", loc=["query", "max_points"]
        )
    points = max_points or settings.default_points_per_series
    params = (tuple(sorted(run_id or ())), tuple(sorted(name or ())), step_min, step_max, points, view)
    return _cached_json(
        request,
        session,
        settings,
        job_id,
        ("metrics", *params),
        lambda db: _metrics_body(db, job_id, run_id, name, step_min, step_max, points, view),
    )


def _cached_json(
    request: Request,
    session: Session,
    settings: Settings,
    job_id: int,
    params: tuple[object, ...],
    build: Callable[[Session], bytes],
) -> Response:
    """Serve ``build``'s JSON bytes through the API's read cache (``server.cache``).

    The key adds the job's ``updated_at`` to ``params``, so a finished job's bytes are kept until
    anything about the job changes, and a running job's for ``live_ttl`` only; an expired live entry
    is served while one background refresh recomputes it, and a cold key is computed once however
    many readers arrive together.
    """
    status, updated_at = _marker(session, job_id)
    cache: ReadCache = request.app.state.read_cache
    key = (updated_at, *params)
    cached, fresh = cache.lookup(job_id, key)
    if fresh:
        return Response(cached, media_type="application/json")

    def compute(db: Session) -> tuple[bytes, float | None]:
        started = time.perf_counter()
        body = build(db)
        cost = time.perf_counter() - started
        return body, None if status in TERMINAL else live_ttl(settings.live_read_ttl_s, cost)

    if cached is not None:  # an expired live entry: serve it, refresh it off the request path
        cache.refresh_in_background(job_id, key, lambda: _with_session(settings, compute))
        return Response(cached, media_type="application/json")
    with cache.single_flight(job_id, key):  # cold: one reader aggregates, the others wait for it
        cached = cache.get(job_id, key)
        if cached is None:
            cached, ttl = compute(session)
            cache.put(job_id, key, cached, ttl=ttl)
    return Response(cached, media_type="application/json")


@router.get(
    "/summary",
    response_model=JobResultsOut,
    summary="Per-optimizer summary, winner, time to target and Fisher verdict",
)
def get_summary(
    job_id: JobId,
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Response:
    """What the dashboard's summary table, ``dykaf-lab watch`` and ``./lab up`` show (``server.summary``):
    means over the runs that finished their schedule; partial and pending runs are counted apart."""

    def build(db: Session) -> bytes:
        result = load_job_summary(db, job_id)
        return json.dumps(jsonable(result), separators=(",", ":"), allow_nan=False).encode()

    return _cached_json(request, session, settings, job_id, ("summary",), build)


def _with_session(
    settings: Settings, fn: Callable[[Session], tuple[bytes, float | None]]
) -> tuple[bytes, float | None]:
    """Run ``fn`` with a fresh session (the request's is closed once the response is sent)."""
    db = session_factory(settings.database_url)()
    try:
        return fn(db)
    finally:
        db.close()


def live_ttl(base_s: float, cost_s: float) -> float:
    """How long a running job's read is served from memory: ``live_read_ttl_s``, stretched to
    ``LIVE_COST_FACTOR ×`` what the aggregation cost, so that a large job being watched spends at
    most ~1/``LIVE_COST_FACTOR`` of an API process re-aggregating (an aggregation of 0.45 s: read
    cached for 4.5 s). 0 keeps running jobs uncached."""
    return 0.0 if base_s <= 0 else max(base_s, LIVE_COST_FACTOR * cost_s)


def _metrics_body(
    session: Session,
    job_id: int,
    run_id: list[int] | None,
    name: list[str] | None,
    step_min: int | None,
    step_max: int | None,
    points: int,
    view: str,
) -> bytes:
    """The downsampled series as JSON bytes (serialised once: hits send the stored bytes)."""
    flt = metrics_crud.MetricFilter(job_id, run_id or (), name or (), step_min, step_max)
    runs = _runs(session, job_id)
    series_out, aggregates_out, plan = [], [], None
    if view in ("runs", "both"):
        series, plan = metrics_crud.downsampled_series(session, flt, points)
        for s in series:
            rid, metric = s.key
            label, seed = runs[rid]
            series_out.append(
                {
                    "run_id": rid,
                    "label": label,
                    "seed": seed,
                    "name": metric,
                    "step": s.step,
                    "value": s.value,
                    "min": s.min,
                    "max": s.max,
                    "count": s.count,
                }
            )
    if view in ("aggregate", "both"):
        aggs, plan = metrics_crud.aggregated_series(session, flt, points)
        for s in aggs:
            label, metric = s.key
            aggregates_out.append(
                {
                    "label": label,
                    "name": metric,
                    "step": s.step,
                    "mean": s.value,
                    "min": s.min,
                    "max": s.max,
                    "std": s.std,
                    "n": s.count,
                }
            )
    names = sorted({s["name"] for s in series_out} | {a["name"] for a in aggregates_out})
    payload = {
        "job_id": job_id,
        "names": names,
        "max_points": points,
        "bucket_width": plan.width if plan else 1,
        "source": plan.source if plan else "raw",
        "series": series_out,
        "aggregates": aggregates_out,
    }
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


@router.get("/fisher", response_model=FisherOut, summary="Fisher-fidelity diagnostics")
def get_fisher(
    job_id: JobId,
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
    run_id: Annotated[list[RunIdItem] | None, Query()] = None,
    layer: Annotated[list[str] | None, Query()] = None,
    method: Annotated[list[str] | None, Query()] = None,
    metric: Annotated[list[str] | None, Query()] = None,
) -> Response:
    # Cached like /metrics: a dashboard refreshes every few seconds and asks for every run's
    # kron_rel_err, while the rows change only when a run reports (every fisher_every steps).
    flt = metrics_crud.FisherFilter(
        job_id,
        tuple(sorted(run_id or ())),
        tuple(sorted(layer or ())),
        tuple(sorted(method or ())),
        tuple(sorted(metric or ())),
    )
    return _cached_json(request, session, settings, job_id, ("fisher", flt), lambda db: _fisher_body(db, flt))


def _fisher_body(session: Session, flt: metrics_crud.FisherFilter) -> bytes:
    runs = _runs(session, flt.job_id)
    out = []
    for s in metrics_crud.fisher_series(session, flt):
        rid, lay, meth, met = s.key
        label, seed = runs[rid]
        out.append(
            {
                "run_id": rid,
                "label": label,
                "seed": seed,
                "layer": lay,
                "method": meth,
                "metric": met,
                "step": s.step,
                "value": s.value,
            }
        )
    return json.dumps({"job_id": flt.job_id, "series": out}, separators=(",", ":"), allow_nan=False).encode()


def _csv_response(request: Request, job_id: int, kind: str, body: object) -> StreamingResponse:
    return StreamingResponse(
        body,  # type: ignore[arg-type]
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}-{kind}.csv"'},
    )


_CSV_DOC = {200: {"content": {"text/csv": {}}, "description": "CSV stream"}}


def _add_csv_route(kind: str, streamer: Callable[..., Iterator[str]], summary: str) -> None:
    """One streamed full-fidelity CSV endpoint (``/{kind}.csv``); the three differ only in the rows."""

    def endpoint(
        job_id: JobId,
        request: Request,
        session: Annotated[Session, Depends(get_session)],
        settings: Annotated[Settings, Depends(get_settings)],
    ) -> StreamingResponse:
        _marker(session, job_id)
        return _csv_response(request, job_id, kind, streamer(session_factory(settings.database_url), job_id))

    router.add_api_route(
        f"/{kind}.csv",
        endpoint,
        methods=["GET"],
        name=f"get_{kind}_csv",
        response_class=StreamingResponse,
        responses=_CSV_DOC,
        summary=summary,
    )


_add_csv_route("metrics", metrics_csv, "All metric points")
_add_csv_route("runs", runs_csv, "One row per run (partial marks a run that stopped early)")
_add_csv_route("summary", summary_csv, "One row per optimizer configuration (the summary's rows)")
_add_csv_route("fisher", fisher_csv, "All Fisher rows")
