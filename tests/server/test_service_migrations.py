"""Alembic migrations: empty → head → base on PostgreSQL and SQLite, and head matches the models."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from server.db import migrate
from server.db.models import Base
from server.db.session import create_db_engine

TABLES = {"api_keys", "jobs", "runs", "metrics", "metric_rollups", "fisher", "studies", "workers"}


def _tables(url: str) -> set[str]:
    engine = create_db_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_up_and_down_on_both_backends(any_empty_settings: Any) -> None:
    url = any_empty_settings.database_url
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == TABLES
    assert migrate.current_revision(url) == migrate.head_revision()
    engine = create_db_engine(url)
    try:
        inspector = inspect(engine)
        assert inspector.get_pk_constraint("metrics")["constrained_columns"] == ["run_id", "name", "step"]
        assert inspector.get_pk_constraint("fisher")["constrained_columns"] == [
            "run_id",
            "step",
            "layer",
            "method",
            "metric",
        ]
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diffs == [], f"models and migrations disagree: {diffs}"
    finally:
        engine.dispose()
    # 0004 alone: down to the studies revision drops only the workers registry, and back up.
    migrate.downgrade(url, "0003_studies")
    assert _tables(url) == TABLES - {"workers"}
    migrate.upgrade(url)
    engine = create_db_engine(url)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("workers")}
        assert columns == {"name", "host", "kind", "devices", "started_at", "last_seen"}
        assert inspect(engine).get_pk_constraint("workers")["constrained_columns"] == ["name"]
    finally:
        engine.dispose()
    migrate.downgrade(url, "base")
    assert _tables(url) == set()
    assert migrate.current_revision(url) is None
    migrate.upgrade(url)  # and back up again: downgrade left nothing behind that blocks it
    assert _tables(url) == TABLES
