"""The dashboard: three HTML pages, their static assets, and one small read endpoint for them.

Pages are thin shells (``web/templates``) whose content is built in the browser by vanilla ES
modules (``web/static/js``) from the public REST API, so the dashboard sees exactly what any API
client sees. Plotly.js comes from the installed ``plotly`` Python package and is served locally
(pre-compressed once per process), so the dashboard works offline. Static URLs carry a content
hash (``?v=``) and are cached for a year; pages themselves are never cached.

The only non-page endpoint, ``GET /api/v1/ui/job-specs``, returns the optimizer labels, seeds and
step count of several jobs at once: the job list API carries summaries only, and fetching every
job's full detail on the Jobs page (all runs included) would cost one heavy request per row.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import mimetypes
import threading
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.api.deps import get_session
from server.auth import read_access
from server.db.models import Job
from server.errors import ApiError

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
YEAR = 365 * 24 * 3600
MAX_SPEC_IDS = 200


def plotly_path() -> Path:
    """Plotly.js as shipped inside the plotly Python package (no CDN, no npm)."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


class StaticAsset:
    """A file served from memory with its gzip variant, a strong ETag and a content version."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.body = path.read_bytes()
        self.digest = hashlib.sha256(self.body).hexdigest()[:16]
        self.gzipped = gzip.compress(self.body, compresslevel=6, mtime=0)
        self.media_type = media_type(path)

    def response(self, request: Request, versioned: bool) -> Response:
        etag = f'"{self.digest}"'
        headers = {
            "ETag": etag,
            "Vary": "Accept-Encoding",
            "Cache-Control": f"public, max-age={YEAR}, immutable" if versioned else "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        accepts_gzip = "gzip" in request.headers.get("accept-encoding", "").lower()
        if accepts_gzip and len(self.gzipped) < len(self.body):
            headers["Content-Encoding"] = "gzip"
            return Response(self.gzipped, media_type=self.media_type, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


class AssetStore:
    """Loads static files lazily and keeps them (the dashboard's files are few and small)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._cache: dict[str, StaticAsset] = {}
        self._lock = threading.Lock()

    def warm(self, names: tuple[str, ...] = ("plotly.min.js",)) -> threading.Thread:
        """Read and compress the big assets in the background, so the first page view doesn't."""
        thread = threading.Thread(target=lambda: [self.get(n) for n in names], name="web-assets", daemon=True)
        thread.start()
        return thread

    def resolve(self, name: str) -> Path | None:
        if name == "plotly.min.js":
            path = plotly_path()
            return path if path.is_file() else None
        candidate = (self.root / name).resolve()
        if self.root not in candidate.parents or not candidate.is_file():
            return None
        return candidate

    def get(self, name: str) -> StaticAsset | None:
        asset = self._cache.get(name)
        if asset is not None:
            return asset
        with self._lock:  # one reader/compressor per file, however many requests arrive at once
            asset = self._cache.get(name)
            if asset is None:
                path = self.resolve(name)
                if path is None:
                    return None
                asset = self._cache[name] = StaticAsset(path)
        return asset

    def url(self, name: str) -> str:
        asset = self.get(name)
        version = asset.digest if asset is not None else "missing"
        return f"/static/{name}?v={version}"


def media_type(path: Path) -> str:
    known = {
        ".js": "text/javascript",
        ".css": "text/css",
        ".svg": "image/svg+xml",
        ".json": "application/json",
    }
    media = known.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"{media}; charset=utf-8" if media.startswith("text/") else media


def _security_headers() -> dict[str, str]:
    # Everything the pages load comes from this origin; inline scripts are not used at all.
    return {
        "Content-Security-Policy": (
            "default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'self'; "
            "frame-ancestors 'none'"
        ),
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }


def create_web_router(web_dir: Path = WEB_DIR) -> APIRouter:
    """Pages at ``/``, ``/new``, ``/jobs/{id}``; assets at ``/static/...``; ``/api/v1/ui/job-specs``."""
    store = _store(Path(web_dir) / "static")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(web_dir) / "templates")), autoescape=True
    )
    templates = Jinja2Templates(env=env)
    templates.env.globals["static"] = store.url
    router = APIRouter(include_in_schema=False)

    def page(request: Request, template: str, title: str, **context: Any) -> HTMLResponse:
        response = templates.TemplateResponse(
            request, template, {"title": title, **context}, headers=_security_headers()
        )
        return response  # type: ignore[return-value]

    @router.get("/", response_class=HTMLResponse)
    def jobs_page(request: Request) -> HTMLResponse:
        return page(request, "jobs.html", "Jobs", page_id="jobs")

    @router.get("/new", response_class=HTMLResponse)
    def new_job_page(request: Request) -> HTMLResponse:
        return page(request, "new.html", "New job", page_id="new")

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: int) -> HTMLResponse:
        return page(request, "job.html", f"Job {job_id}", page_id="job", job_id=job_id)

    @router.get("/studies/{study_id}", response_class=HTMLResponse)
    def study_page(request: Request, study_id: int) -> HTMLResponse:
        return page(request, "study.html", f"Study {study_id}", page_id="study", study_id=study_id)

    @router.get("/static/{name:path}")
    def static(name: str, request: Request) -> Response:
        asset = store.get(name)
        if asset is None:
            return Response(
                html.escape(f"not found: /static/{name}"), status_code=404, media_type="text/plain"
            )
        return asset.response(request, versioned="v" in request.query_params)

    @router.get(
        "/api/v1/ui/job-specs",
        dependencies=[Depends(read_access)],
        include_in_schema=True,
        tags=["dashboard"],
        summary="Optimizer labels, seeds and steps of several jobs (for the dashboard's job list)",
    )
    def job_specs(
        session: Annotated[Session, Depends(get_session)],
        job_id: Annotated[list[int], Query(alias="id", description="job ids (repeatable)")],
    ) -> dict[str, dict[str, Any]]:
        if len(job_id) > MAX_SPEC_IDS:
            raise ApiError(422, f"at most {MAX_SPEC_IDS} ids per request", loc=["query", "id"])
        rows = session.execute(select(Job.id, Job.spec).where(Job.id.in_(job_id)))
        return {str(jid): spec_digest(spec) for jid, spec in rows}

    return router


def spec_digest(spec: dict[str, Any] | None) -> dict[str, Any]:
    """What the job list shows of a spec: optimizer labels (and names), seeds, steps, target."""
    spec = spec or {}
    optimizers = []
    for opt in spec.get("optimizers") or []:
        if isinstance(opt, dict):
            name = str(opt.get("name", "?"))
            optimizers.append({"name": name, "label": str(opt.get("label") or name)})
    task = spec.get("task") or {}
    return {
        "optimizers": optimizers,
        "seeds": list(spec.get("seeds") or []),
        "steps": task.get("steps"),
        "kind": task.get("kind"),
        "target_loss": spec.get("target_loss"),
    }


@lru_cache(maxsize=4)
def _store(static_dir: Path) -> AssetStore:
    """One asset store per directory per process (assets are read once, then served from memory)."""
    return AssetStore(static_dir)


def install(app: FastAPI, web_dir: Path = WEB_DIR) -> None:
    """Add the dashboard's routes to ``app`` (called by ``server.main.mount_web``)."""
    app.include_router(create_web_router(web_dir))
    _store(Path(web_dir) / "static").warm()
