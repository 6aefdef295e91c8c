"""The dashboard's server side without a browser: pages, assets (local Plotly.js, gzip, caching,
no path traversal), security headers, and the ``/api/v1/ui/job-specs`` read."""

from __future__ import annotations

import gzip
import re
from typing import Any

import pytest
from sqlalchemy import update

from server.db.models import Job
from server.db.session import session_scope
from server.web import plotly_path, spec_digest
from tests.support.services import tiny_job


@pytest.fixture
def api(sqlite_settings: Any, api_factory: Any) -> Any:
    return api_factory(sqlite_settings)


@pytest.mark.parametrize(
    ("path", "page", "script"),
    [("/", "jobs", "jobs.js"), ("/new", "new", "new.js"), ("/jobs/7", "job", "job.js")],
)
def test_pages(api: Any, path: str, page: str, script: str) -> None:
    r = api.client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert f'data-page="{page}"' in r.text
    assert re.search(rf'<script type="module" src="/static/js/{script}\?v=[0-9a-f]{{16}}"', r.text)
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert r.headers["cache-control"] == "no-cache"
    # No inline script anywhere: every script tag has a src.
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", r.text))
    assert "cdn" not in r.text.lower()


def test_job_page_loads_local_plotly_in_parallel(api: Any) -> None:
    """Plotly.js comes from this server, loads ``async`` (the page's module fetches the data
    meanwhile), and the module graph is preloaded in one round."""
    text = api.client.get("/jobs/1").text
    tag = re.search(r'<script id="plotly-js" src="/static/plotly\.min\.js\?v=[0-9a-f]{16}" async>', text)
    assert tag, text
    for module in ("api", "dom", "format", "stats", "common", "charts"):
        assert f'<link rel="modulepreload" href="/static/js/{module}.js">' in text
    assert "charts.js" not in api.client.get("/new").text


def test_plotly_served_from_the_plotly_package(api: Any) -> None:
    raw = plotly_path().read_bytes()
    r = api.client.get("/static/plotly.min.js?v=x", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert r.headers["content-type"].startswith("text/javascript")
    assert "immutable" in r.headers["cache-control"]
    # httpx decodes gzip transparently; the body is the package's file byte for byte.
    assert r.content == raw
    assert int(r.headers["content-length"]) == len(gzip.compress(raw, compresslevel=6, mtime=0))
    assert int(r.headers["content-length"]) < len(raw) / 2
    etag = r.headers["etag"]
    again = api.client.get("/static/plotly.min.js?v=x", headers={"If-None-Match": etag})
    assert again.status_code == 304


def test_static_assets_and_traversal(api: Any) -> None:
    css = api.client.get("/static/css/app.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "@media print" in css.text
    assert css.headers["cache-control"] == "no-cache"  # unversioned URL: revalidate
    assert api.client.get("/static/js/stats.js").headers["content-type"].startswith("text/javascript")
    for bad in ("/static/../server/web.py", "/static/%2e%2e/server/web.py", "/static/nope.js"):
        assert api.client.get(bad).status_code == 404, bad


def test_no_html_injection_sinks_in_scripts() -> None:
    """The dashboard writes data only as text: no innerHTML/outerHTML/insertAdjacentHTML/eval."""
    from server.web import WEB_DIR

    for path in (WEB_DIR / "static" / "js").glob("*.js"):
        text = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{path.name} uses {sink}"


def test_job_specs_endpoint(api: Any) -> None:
    ids = []
    for name in ("one", "two"):
        r = api.post("/jobs", json=tiny_job(name=name, seeds=(0, 3)))
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = api.get("/ui/job-specs", params=[("id", ids[0]), ("id", ids[1]), ("id", 999)])
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {str(i) for i in ids}
    assert body[str(ids[0])]["optimizers"] == [
        {"name": "adamw", "label": "adamw"},
        {"name": "dykaf", "label": "dykaf"},
    ]
    assert body[str(ids[0])]["seeds"] == [0, 3] and body[str(ids[0])]["steps"] == 12
    assert api.get("/ui/job-specs").status_code == 422
    too_many = [("id", i) for i in range(201)]
    assert api.get("/ui/job-specs", params=too_many).status_code == 422


def test_job_specs_respects_read_keys(sqlite_settings: Any, api_factory: Any) -> None:
    api = api_factory(sqlite_settings.with_(reads_require_key=True))
    assert api.get("/ui/job-specs", params={"id": 1}).status_code == 401
    assert api.get("/ui/job-specs", params={"id": 1}, headers=api.auth).status_code == 200


def test_page_escapes_nothing_from_the_database(api: Any) -> None:
    """Pages are static shells: a hostile job name never reaches the HTML the server renders."""
    r = api.post("/jobs", json=tiny_job(name="plain"))
    job_id = r.json()["id"]
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(name="<script>alert(1)</script>"))
    for path in ("/", f"/jobs/{job_id}"):
        assert "<script>alert" not in api.client.get(path).text


def test_spec_digest_tolerates_odd_specs() -> None:
    assert spec_digest(None)["optimizers"] == []
    digest = spec_digest({"optimizers": [{"name": "muon", "label": None}, "junk"], "seeds": [1]})
    assert digest["optimizers"] == [{"name": "muon", "label": "muon"}] and digest["seeds"] == [1]


def test_jobs_redirect(api: Any) -> None:
    r = api.client.get("/jobs", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/"


def test_chart_data_is_gzipped_for_clients_that_accept_it(api: Any) -> None:
    """/metrics and /fisher bodies compress ~8×: a dashboard on another machine waits on the bytes."""
    from server.crud import jobs as jobs_crud
    from server.crud.metrics import insert_fisher, insert_metrics
    from server.db.session import get_engine
    from server.jobs.spec import JobSpec

    with session_scope(api.settings.database_url) as session:
        job = jobs_crud.create_job(session, JobSpec.model_validate(tiny_job()), auto_queue="cpu")
        job_id, run_id = job.id, job.runs[0].id
    with get_engine(api.settings.database_url).begin() as conn:
        insert_metrics(conn, [(run_id, "train_loss", s, 1.0 / s, float(s)) for s in range(1, 400)])
        insert_fisher(conn, [(run_id, s, "w", "optimal", "kron_rel_err", 0.5) for s in range(1, 200)])
    for path in (f"/api/v1/jobs/{job_id}/metrics", f"/api/v1/jobs/{job_id}/fisher"):
        plain = api.client.get(path, headers={"Accept-Encoding": "identity"})
        packed = api.client.get(path, headers={"Accept-Encoding": "gzip"})
        assert plain.status_code == packed.status_code == 200
        assert "content-encoding" not in plain.headers and packed.headers["content-encoding"] == "gzip"
        assert packed.json() == plain.json()  # httpx decodes it: the same document
        assert packed.num_bytes_downloaded * 3 < plain.num_bytes_downloaded, path
