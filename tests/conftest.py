"""Shared fixtures: real PostgreSQL, Redis, SQLite, Celery worker subprocesses and API clients.

PostgreSQL and Redis are used when reachable (``DYKAF_TEST_PG_URL``, default
``postgresql://postgres@127.0.0.1:5432/postgres``; ``DYKAF_TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/0``). When they are not, dependent tests skip with the reason — unless
``DYKAF_REQUIRE_SERVICES=1`` (CI), where the same condition fails the test.

Each test gets its own PostgreSQL database (random name, dropped afterwards) and its own Redis key
prefix, so concurrent test sessions on one machine never see each other's rows or tasks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("DYKAF_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DYKAF_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def services_required() -> bool:
    return os.environ.get("DYKAF_REQUIRE_SERVICES", "").strip() in {"1", "true", "yes"}


def service_unavailable(reason: str) -> None:
    """Skip (developer machine) or fail (CI sets DYKAF_REQUIRE_SERVICES=1)."""
    if services_required():
        pytest.fail(f"{reason} (required because DYKAF_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


# --- PostgreSQL --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_admin() -> str:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        service_unavailable(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database (dropped after the test)."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"dykaf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_admin).set(drivername="postgresql+psycopg", database=name)
    rendered = url.render_as_string(hide_password=False)
    try:
        yield rendered
    finally:
        from server.db.session import dispose_engines

        dispose_engines()
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- Redis -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server() -> str:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        service_unavailable(f"Redis not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_server: str) -> Iterator[str]:
    """A key prefix private to this test; its keys are deleted afterwards."""
    import redis

    prefix = f"dykaf-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(redis_server)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


# --- settings ----------------------------------------------------------------------------------
FAST = {
    "heartbeat_s": 0.25,
    "stale_after_s": 6.0,
    "reconcile_every_s": 0.5,
    "flush_every_s": 0.25,
    "reconcile": False,
    "auto_queue": "cpu",
}


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Any:
    """Embedded mode: SQLite database and SQLAlchemy-transport broker under ``tmp_path``."""
    from server.core.config import Settings

    return Settings(data_dir=tmp_path / "lab", **FAST)


@pytest.fixture
def pg_settings(tmp_path: Path, pg_url: str, redis_server: str, redis_prefix: str) -> Any:
    """Cluster mode: PostgreSQL + Redis."""
    from server.core.config import Settings

    return Settings(
        data_dir=tmp_path / "lab",
        database_url=pg_url,
        broker_url=redis_server,
        broker_key_prefix=redis_prefix,
        **FAST,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def any_settings(request: pytest.FixtureRequest) -> Any:
    """Both backends: PostgreSQL+Redis and SQLite+SQLAlchemy broker."""
    name = "sqlite_settings" if request.param == "sqlite" else "pg_settings"
    return request.getfixturevalue(name)


# --- API ---------------------------------------------------------------------------------------
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


@pytest.fixture
def api_factory() -> Iterator[Callable[[Any], Api]]:
    made: list[Api] = []

    def make(settings: Any) -> Api:
        api = Api(settings)
        made.append(api)
        return api

    yield make
    for api in made:
        api.client.close()


# --- Celery workers ----------------------------------------------------------------------------
class WorkerProcess:
    """A real ``celery worker`` subprocess (solo pool, one run at a time)."""

    def __init__(
        self, settings: Any, log_path: Path, name: str, extra_env: dict[str, str] | None = None
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
        from worker.cli_service import celery_worker_argv

        self.proc = subprocess.Popen(
            celery_worker_argv("gpu,cpu", f"{name}@%h"),
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


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(settings: Any, name: str | None = None, **env: str) -> WorkerProcess:
        name = name or f"w{len(workers)}"
        worker = WorkerProcess(settings, tmp_path / f"worker-{name}.log", name, env)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for the test: the worker's ``--threads 1`` path (MKL's float32
    eigh fails there, tests/test_linalg.py), and the same thread count in a background thread as
    in the caller's, so products round identically (tests/test_fisher_background.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
