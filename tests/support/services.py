"""Plain helpers shared by the service tests (fixtures live in ``tests/conftest.py``).

PostgreSQL and Redis are used when reachable (``DYKAF_TEST_PG_URL``, default
``postgresql://postgres@127.0.0.1:5432/postgres``; ``DYKAF_TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/0``). When they are not, dependent tests skip with the reason, unless
``DYKAF_REQUIRE_SERVICES=1`` (CI), where the same condition fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("DYKAF_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DYKAF_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def services_required() -> bool:
    return os.environ.get("DYKAF_REQUIRE_SERVICES", "").strip() in {"1", "true", "yes"}


def service_unavailable(reason: str) -> None:
    """Skip (developer machine) or fail (CI sets DYKAF_REQUIRE_SERVICES=1)."""
    if services_required():
        pytest.fail(f"{reason} (required because DYKAF_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


# Settings that make heartbeats, reconciliation and flushes fast enough for tests.
FAST = {
    "heartbeat_s": 0.25,
    "stale_after_s": 6.0,
    "reconcile_every_s": 0.5,
    "flush_every_s": 0.25,
    "reconcile": False,
    "auto_queue": "cpu",
}


class Api:
    """A TestClient on a migrated database plus a valid API key."""

    def __init__(self, settings: Any) -> None:
        from fastapi.testclient import TestClient

        from server.crud.api_keys import create_key
        from server.db import migrate
        from server.db.session import session_scope
        from server.main import create_app

        migrate.upgrade(settings.database_url)
        with session_scope(settings.database_url) as session:
            _, self.token = create_key(session, "test")
        self.settings = settings
        self.app = create_app(settings)
        self.client = TestClient(self.app)
        self.auth = {"Authorization": f"Bearer {self.token}"}

    def post(self, path: str, **kwargs: Any) -> Any:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return self.client.post(f"/api/v1{path}", headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(f"/api/v1{path}", **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return self.client.delete(f"/api/v1{path}", headers=headers, **kwargs)

    def wait_job(self, job_id: int, statuses: set[str], timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.get(f"/jobs/{job_id}").json()
            if body["status"] in statuses:
                return body
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout}s; last: {body}")


class WorkerProcess:
    """A real ``celery worker`` subprocess (solo pool, one run at a time); with ``cpus``, the one
    ``dykaf-lab worker --queue gpu,cpu --cpus N`` starts (same queues, pool and environment)."""

    def __init__(
        self,
        settings: Any,
        log_path: Path,
        name: str,
        extra_env: dict[str, str] | None = None,
        cpus: int | None = None,
    ) -> None:
        env = {
            **os.environ,
            **settings.env(),
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        env.pop("DYKAF_REQUIRE_SERVICES", None)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        # Exactly the command `dykaf-lab worker` runs, so the tests exercise the production setup.
        from worker.worker_plan import celery_worker_argv, plan_worker

        argv = celery_worker_argv("gpu,cpu", f"{name}@%h")
        if cpus is not None:
            plan = plan_worker(queue="gpu,cpu", cpus=cpus, name=f"{name}@%h", environ=env)
            argv, env = plan.argv(), plan.env
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the abrupt death the service must survive."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Cold shutdown (SIGQUIT): at teardown no run is in progress, so no need to wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def tiny_job(
    name: str = "tiny", steps: int = 12, seeds: tuple[int, ...] = (0,), **task: Any
) -> dict[str, Any]:
    """A job that trains in about a second per run on one CPU core."""
    return {
        "name": name,
        "device": "cpu",
        "seeds": list(seeds),
        "task": {
            "n_layer": 1,
            "n_head": 2,
            "d_model": 16,
            "context": 16,
            "batch_size": 4,
            "steps": steps,
            "warmup_steps": 2,
            "eval_every": 6,
            "eval_batches": 1,
            "log_every": 1,
            "fisher_every": 4,
            "checkpoint_every": 4,
            "corpus": {"name": "pydoc", "max_chars": 20000},
            **task,
        },
        "optimizers": [
            {"name": "adamw", "hyperparameters": {"lr": 0.003}},
            {"name": "dykaf", "hyperparameters": {"lr": 0.003}},
        ],
    }
