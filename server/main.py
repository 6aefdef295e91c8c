"""FastAPI application factory.

``uvicorn --factory server.main:create_app`` (or ``dykaf-lab api``) builds the app from
``DYKAF_*`` environment variables; tests call ``create_app(settings)`` directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import RedirectResponse
from fastapi_offline import FastAPIOffline

from server import web
from server.api.main import api_router
from server.api.routes import health
from server.cache import ReadCache
from server.core.config import Settings
from server.errors import install_error_handlers
from server.jobs.reconcile import start_reconciler_thread
from server.limits import BodySizeLimit
from server.observability import PrometheusMiddleware
from server.ratelimit import make_write_limiter

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
WEB_DIR = Path(__file__).resolve().parents[1] / "web"


def mount_web(app: FastAPI) -> None:
    """The dashboard (``server.web``): pages at ``/``, ``/new``, ``/jobs/{id}`` and ``/static/...``
    from ``WEB_DIR`` (``web/templates``, ``web/static``); ``/jobs`` leads to the job list."""
    web.install(app, WEB_DIR)

    @app.get("/jobs", include_in_schema=False)
    def jobs_index() -> RedirectResponse:
        return RedirectResponse("/")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        if settings.reconcile:
            start_reconciler_thread(settings, stop)
        try:
            yield
        finally:
            stop.set()

    # FastAPI's /docs and /redoc load Swagger UI and ReDoc from a CDN, so offline (or behind a
    # firewall) they are blank pages; fastapi-offline serves the same assets from its package.
    app = FastAPIOffline(
        title="dykaf-lab",
        version="0.1.0",
        summary="Optimizer-comparison jobs (DyKAF vs AdamW/SOAP/Shampoo/Muon): submit, follow, export.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.read_cache = ReadCache(settings.read_cache_entries)
    app.state.write_limiter = make_write_limiter(settings)
    install_error_handlers(app)
    app.include_router(api_router, prefix=API_PREFIX)
    app.include_router(health.router)
    mount_web(app)
    # Chart data (/metrics, /fisher) is JSON that compresses well (BENCHMARKS.md, "Dashboard"), and CSV
    # exports compress as well; a dashboard on another machine than the API then waits on far
    # fewer bytes. Static files carry their own precomputed gzip (``server.web``) and pass through.
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=5)
    app.add_middleware(PrometheusMiddleware)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
