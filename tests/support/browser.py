"""Helpers for the dashboard's browser tests and benchmark: a real uvicorn server subprocess, an
API key, and Debian's Chromium driven by Playwright (never a downloaded browser).

Chromium missing → the test is skipped with the reason, unless ``DYKAF_REQUIRE_SERVICES=1`` (CI),
where it fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worker.cli_service import uvicorn_argv

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("DYKAF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


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


def launch_chromium(playwright: Any, **kwargs: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, **kwargs)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_api_key(database_url: str, name: str = "dashboard-test") -> str:
    from server.crud.api_keys import create_key
    from server.db.session import session_scope

    with session_scope(database_url) as session:
        _, token = create_key(session, name)
    return token


class ServerProcess:
    """``uvicorn --factory server.main:create_app`` on a free port, configured by ``settings.env()``."""

    def __init__(self, settings: Any, log_path: Path, port: int | None = None, **env: str) -> None:
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {**os.environ, **settings.env(), "PYTHONPATH": str(ROOT), **env}
        self.env.pop("DYKAF_REQUIRE_SERVICES", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            uvicorn_argv("127.0.0.1", self.port),
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server did not answer within {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


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
