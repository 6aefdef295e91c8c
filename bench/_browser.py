"""Debian's Chromium under Playwright and the API server as a subprocess: what the dashboard
benchmark (``bench/dashboard.py``), the browser tests (``tests/support/browser.py``) and the README
screenshot (``docs/screenshot.py``) share, so that all three measure and see the same setup.

The browser is always the system's (``DYKAF_CHROMIUM``, ``/usr/bin/chromium`` by default), never one
Playwright downloads; the server is exactly the command ``dykaf-lab up`` starts (``uvicorn_argv``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench._common import ROOT, free_port
from worker.cli_service import uvicorn_argv

CHROMIUM = os.environ.get("DYKAF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch_chromium(playwright: Any, **kwargs: Any) -> Any:
    """Headless Chromium from ``CHROMIUM`` with ``CHROMIUM_ARGS``."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, **kwargs)


class ServerProcess:
    """``uvicorn --factory server.main:create_app`` on a free port, configured by ``settings.env()``;
    restartable (``start`` after ``stop``), so a first visit can be timed against a fresh server."""

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
