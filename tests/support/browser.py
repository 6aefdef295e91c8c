"""Helpers for the dashboard's browser tests: a real uvicorn server subprocess, an API key, and
Debian's Chromium driven by Playwright (never a downloaded browser); the server and the browser
launch are ``bench/_browser.py``'s, shared with the dashboard benchmark.

Chromium missing → the test is skipped with the reason, unless ``DYKAF_REQUIRE_SERVICES=1`` (CI),
where it fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._browser import CHROMIUM, CHROMIUM_ARGS, ServerProcess, launch_chromium
from bench._common import free_port

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "ServerProcess",
    "create_api_key",
    "free_port",
    "launch_chromium",
    "require_chromium",
    "running_server",
]

ROOT = Path(__file__).resolve().parents[2]


def services_required() -> bool:
    return os.environ.get("DYKAF_REQUIRE_SERVICES", "").strip() in {"1", "true", "yes"}


def require_chromium() -> str:
    """The Chromium binary, or skip (fail under ``DYKAF_REQUIRE_SERVICES=1``) when it is missing."""
    import pytest

    problem = None
    if not Path(CHROMIUM).exists():
        problem = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError as exc:
            problem = f"the playwright package is not installed: {exc}"
    if problem:
        if services_required():
            pytest.fail(f"{problem} (required because DYKAF_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(problem)
    return CHROMIUM


def create_api_key(database_url: str, name: str = "dashboard-test") -> str:
    from server.crud.api_keys import create_key
    from server.db.session import session_scope

    with session_scope(database_url) as session:
        _, token = create_key(session, name)
    return token


@contextmanager
def running_server(settings: Any, log_path: Path, **env: str) -> Iterator[ServerProcess]:
    server = ServerProcess(settings, log_path, **env).start()
    try:
        yield server
    finally:
        server.stop()


def plotly_traces(page: Any, selector: str) -> int:
    """Number of traces Plotly drew in the chart div matching ``selector`` (-1 if not a plot)."""
    return int(
        page.evaluate(
            "(sel) => { const el = document.querySelector(sel); "
            "return el && el.data ? el.data.length : -1; }",
            selector,
        )
    )
