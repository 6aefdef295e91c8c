"""The study page in a real browser (Chromium via Playwright) against a real uvicorn server on
SQLite. The study's runs are finished by hand with chosen losses (the worker path is covered by
tests/server/test_study_api.py), so the page's numbers can be checked exactly: the results table
with a hand-computed 2× speed-up and a bound, the edge warning, and the traces of every chart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.core.config import Settings
from server.db import migrate
from server.db.session import dispose_engines, session_scope
from server.studies import orchestrate
from server.studies.spec import parse_study
from tests.support.browser import (
    ServerProcess,
    create_api_key,
    launch_chromium,
    plotly_traces,
    require_chromium,
)
from tests.support.services import FAST
from tests.support.studies import finish_all, study_body

SWEEP = {"adamw": {0.001: 3.0, 0.003: 2.9, 0.01: 3.05}, "muon": {0.001: 3.1, 0.003: 2.95, 0.01: 2.85}}
BUDGET = {"adamw@2x": 2.8, "adamw@4x": 2.7}


def loss_of(spec: dict[str, Any]) -> float:
    """d16 and d32 alike: baseline 2.9/2.8/2.7 at 1x/2x/4x; muon 2.85 and 2.75 (mean 2.8: 2x)."""
    group, lr = spec["group"], spec["sweep_point"]["lr"]
    if group in BUDGET:
        return BUDGET[group]
    if spec["seed"] == 0:
        return SWEEP[group][lr]
    return {"adamw": 2.9, "muon": 2.75}[group]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str, int]]:
    require_chromium()
    root: Path = tmp_path_factory.mktemp("study-page")
    settings = Settings(data_dir=root / "lab", **FAST)
    migrate.upgrade(settings.database_url)
    key = create_api_key(settings.database_url)
    with session_scope(settings.database_url) as session:
        study = orchestrate.create_study(session, parse_study(study_body()), auto_queue="cpu")
        study_id, job_ids = study.id, [j.id for j in study.jobs]
    for job_id, params in zip(job_ids, (1e4, 4e4), strict=True):
        finish_all(settings.database_url, job_id, loss_of, parameters=params)
        finish_all(settings.database_url, job_id, loss_of, parameters=params)
    proc = ServerProcess(settings, root / "server.log").start()
    try:
        yield proc, key, study_id
    finally:
        proc.stop()
        dispose_engines()


def test_study_page_shows_speedups_grids_and_edge_flags(server: tuple[ServerProcess, str, int]) -> None:
    from playwright.sync_api import sync_playwright

    proc, key, study_id = server
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            context = browser.new_context(base_url=proc.url, viewport={"width": 1366, "height": 900})
            context.add_init_script(f"localStorage.setItem('dykaf.apiKey', {key!r})")
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.set_default_timeout(20_000)
            page.goto(f"/studies/{study_id}")
            page.wait_for_selector("#study-root[data-rendered='succeeded']")
            assert "two scales" in page.inner_text("#study-title")
            rows = page.locator("#study-table tbody tr")
            assert rows.count() == 4
            muon = page.locator("#study-table tr[data-scale='d16'][data-optimizer='muon']")
            assert muon.locator("td").nth(2).inner_text() == "lr=0.01"
            assert muon.locator("td[data-col='token']").inner_text().startswith("2× ±")
            adamw = page.locator("#study-table tr[data-scale='d32'][data-optimizer='adamw']")
            assert adamw.locator("td[data-col='token']").inner_text().startswith("1×")
            warnings = page.inner_text("#study-warnings")
            assert "d16: muon: lr 0.01 is the largest tried: extend the grid" in warnings
            assert plotly_traces(page, "#chart-speedup") == 2  # one per optimizer
            assert plotly_traces(page, "#chart-time-speedup") == 2
            xs = page.evaluate("document.querySelector('#chart-speedup').data[1].x")
            assert xs == [1e4, 4e4]  # muon's speed-up against model size
            # per scale: baseline curve + one point per optimizer; grid: one line + one star each
            assert plotly_traces(page, "[data-scale='d16'] .loss-tokens") == 3
            assert plotly_traces(page, "[data-scale='d32'] .grid") == 4
            star = page.evaluate(
                "document.querySelector(\"[data-scale='d16'] .grid\").data"
                ".filter(t => t.marker.symbol === 'star').map(t => [t.x[0], t.y[0]])"
            )
            assert star == [[0.003, 2.9], [0.01, 2.85]]
            href = page.get_attribute("#study-csv", "href")
            assert href == f"/api/v1/studies/{study_id}/study.csv"
            assert not errors, errors
        finally:
            browser.close()
