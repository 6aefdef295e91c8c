"""Shared fixtures: real PostgreSQL, Redis, SQLite, Celery worker subprocesses and API clients.

PostgreSQL and Redis are used when reachable (``DYKAF_TEST_PG_URL``, default
``postgresql://postgres@127.0.0.1:5432/postgres``; ``DYKAF_TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/0``). When they are not, dependent tests skip with the reason — unless
``DYKAF_REQUIRE_SERVICES=1`` (CI), where the same condition fails the test.

Each test gets its own PostgreSQL database (random name, dropped afterwards) and its own Redis key
prefix, so concurrent test sessions on one machine never see each other's rows or tasks. Databases
start at the migrations' head, copied from a template migrated once per session (PostgreSQL:
``CREATE DATABASE … TEMPLATE``; SQLite: a file copy); ``pg_empty_url`` / ``any_empty_settings``
give empty ones to the migrations' own tests.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.services import (
    FAST,
    PG_ADMIN_URL,
    REDIS_URL,
    Api,
    WorkerProcess,
    service_unavailable,
)


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


@contextmanager
def _pg_database(admin_url: str, template: str | None = None) -> Iterator[str]:
    """A database with a random name (a copy of ``template`` when given), dropped on exit."""
    import psycopg
    from sqlalchemy.engine import make_url

    from server.db.session import dispose_engines

    name = f"dykaf_test_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        dispose_engines()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_template(pg_admin: str) -> Iterator[str]:
    """Name of a database migrated once per session; each test's database is a copy of it
    (``CREATE DATABASE … TEMPLATE``), which is much cheaper than running the migrations again."""
    from sqlalchemy.engine import make_url

    from server.db import migrate

    with _pg_database(pg_admin) as url:
        migrate.upgrade(url)
        yield str(make_url(url).database)  # no connection to it stays open: copies need none


@pytest.fixture
def pg_url(pg_admin: str, pg_template: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh database at the migrations' head (dropped after the test)."""
    with _pg_database(pg_admin, template=pg_template) as url:
        yield url


@pytest.fixture
def pg_empty_url(pg_admin: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database (dropped after the test): for migration tests."""
    with _pg_database(pg_admin) as url:
        yield url


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


# --- settings ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database file migrated once per session; ``sqlite_settings`` starts from a copy."""
    from server.db import migrate

    path = tmp_path_factory.mktemp("sqlite-template") / "lab.db"
    migrate.upgrade(f"sqlite:///{path}")  # disposes its engine: the WAL is checkpointed into the file
    return path


@pytest.fixture
def sqlite_settings(tmp_path: Path, sqlite_template: Path) -> Any:
    """Embedded mode: SQLite database (at the migrations' head) and SQLAlchemy-transport broker
    under ``tmp_path``."""
    from server.core.config import Settings

    (tmp_path / "lab").mkdir()
    shutil.copyfile(sqlite_template, tmp_path / "lab" / "lab.db")
    return Settings(data_dir=tmp_path / "lab", **FAST)


@pytest.fixture
def pg_settings(tmp_path: Path, pg_url: str, redis_server: str, redis_prefix: str) -> Any:
    """Cluster mode: PostgreSQL (at the migrations' head) + Redis."""
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


@pytest.fixture(params=["sqlite", "postgresql"])
def any_empty_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Both backends with an empty database (no tables): for the migrations' own tests."""
    from server.core.config import Settings

    if request.param == "sqlite":
        return Settings(data_dir=tmp_path / "empty", **FAST)
    return Settings(data_dir=tmp_path / "empty", database_url=request.getfixturevalue("pg_empty_url"), **FAST)


@pytest.fixture
def data_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Confine local paths to ``tmp_path`` and keep caches there."""
    monkeypatch.setenv("DYKAF_DATA_ROOTS", str(tmp_path))
    monkeypatch.setenv("DYKAF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


# --- API ---------------------------------------------------------------------------------------
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
@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(settings: Any, name: str | None = None, cpus: int | None = None, **env: str) -> WorkerProcess:
        name = name or f"w{len(workers)}"
        worker = WorkerProcess(settings, tmp_path / f"worker-{name}.log", name, env, cpus=cpus)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for the test: the worker's ``--threads 1`` path (MKL's float32
    eigh fails there, tests/dykaf/test_linalg.py), and the same thread count in a background thread as
    in the caller's, so products round identically (tests/dykaf/test_fisher_background.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- markers -----------------------------------------------------------------------------------
# Fixtures that start or reach a real service: a test using any of them is an integration test.
_INTEGRATION_FIXTURES = frozenset(
    {
        "pg_url",
        "pg_empty_url",
        "redis_server",
        "sqlite_settings",
        "pg_settings",
        "any_settings",
        "any_empty_settings",
        "api_factory",
        "worker_factory",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark by what a test touches, so `-m "not integration and not browser"` is the fast inner loop."""
    for item in items:
        if "browser" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.integration)
        elif _INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
