"""Liveness, readiness (DB and broker reachable) and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from server.api.deps import get_settings
from server.core.config import Settings
from server.db.session import get_engine
from server.observability import metrics_payload

router = APIRouter(tags=["health"])


def check_database(settings: Settings) -> str | None:
    try:
        with get_engine(settings.database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return None


def check_broker(settings: Settings, timeout: float = 2.0) -> str | None:
    from kombu import Connection

    try:
        with Connection(settings.broker_url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return None


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker reachable (503 otherwise)")
def readyz(settings: Annotated[Settings, Depends(get_settings)]) -> JSONResponse:
    problems: list[dict[str, Any]] = []
    db = check_database(settings)
    if db:
        problems.append({"loc": ["database"], "msg": db, "type": "unavailable"})
    broker = check_broker(settings)
    if broker:
        problems.append({"loc": ["broker"], "msg": broker, "type": "unavailable"})
    if problems:
        return JSONResponse({"detail": problems}, status_code=503)
    return JSONResponse({"status": "ready", "database": "ok", "broker": "ok"})


@router.get("/metrics", include_in_schema=False)
def prometheus(settings: Annotated[Settings, Depends(get_settings)]) -> Response:
    return Response(metrics_payload(settings.database_url), media_type=CONTENT_TYPE_LATEST)
