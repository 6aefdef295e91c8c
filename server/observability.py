"""Prometheus metrics: request counts/latency per route, jobs submitted, runs per status.

Run counts are read from the database at scrape time (a custom collector), so every API replica
reports the same truth and nothing has to be kept in sync in process memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Receive, Scope, Send

from server.db.models import Run
from server.db.session import session_scope
from server.jobs.status import STATUSES

JOBS_SUBMITTED = Counter("dykaf_jobs_submitted_total", "Jobs accepted by POST /jobs")
REQUESTS = Counter("dykaf_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "dykaf_http_request_duration_seconds",
    "HTTP request latency (until the response starts)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class RunStatusCollector(Collector):
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("dykaf_runs", "Runs in the database by status", labels=["status"])
        counts = dict.fromkeys(STATUSES, 0)
        try:
            with session_scope(self.database_url) as session:
                for status, count in session.execute(select(Run.status, func.count()).group_by(Run.status)):
                    counts[status] = int(count)
        except Exception:  # a scrape must not fail because the DB is down (readyz reports that)
            return
        for status, count in counts.items():
            family.add_metric([status], count)
        yield family


def metrics_payload(database_url: str) -> bytes:
    registry = CollectorRegistry()
    registry.register(RunStatusCollector(database_url))
    return generate_latest(REGISTRY) + generate_latest(registry)


def route_template(scope: Scope) -> str:
    """``/api/v1/jobs/{job_id}/metrics`` for ``/api/v1/jobs/7/metrics``: label values stay bounded.

    Built from the matched path parameters (public ASGI scope data) rather than router internals;
    unmatched paths (404s) share one label so scanners cannot blow up the series count.
    """
    if scope.get("route") is None:
        return "unmatched"
    params = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    segments = [f"{{{params[seg]}}}" if seg in params else seg for seg in scope["path"].split("/")]
    return "/".join(segments)


class PrometheusMiddleware:
    """Counts and times requests by route template (``/api/v1/jobs/{job_id}``), not raw path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def wrapped(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                LATENCY.labels(scope["method"], route_template(scope)).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            REQUESTS.labels(scope["method"], route_template(scope), str(status["code"])).inc()
