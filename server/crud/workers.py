"""The workers registry: which worker processes exist, what kind and how many devices each offers.

Workers upsert their row when they start (``register_worker``) and then every few seconds
(``beat``); the API reads ``largest_offer`` to refuse at submission a run on more devices than any
recently seen worker owns, instead of leaving it queued forever on a ``gpu-xN`` queue nobody
consumes. Times come from the database's clock (``server.db.clock``), as run heartbeats do.
Rows are never deleted: a stopped worker simply stops counting once ``last_seen`` is older than
the caller's window (``Settings.worker_seen_s``), which also covers a restart in progress.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from server.db.clock import db_now
from server.db.models import Worker

KINDS = ("cuda", "cpu")


def _check(kind: str, devices: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if devices < 1:
        raise ValueError(f"devices must be at least 1; got {devices}")


def _row(name: str, host: str, kind: str, devices: int, now: datetime) -> dict[str, Any]:
    _check(kind, devices)
    return {"name": name, "host": host, "kind": kind, "devices": devices, "started_at": now, "last_seen": now}


def _upsert(session: Session, values: dict[str, Any], on_conflict: tuple[str, ...]) -> None:
    """INSERT the row, or UPDATE the columns ``on_conflict`` of the existing one (one statement)."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(Worker).values(**values)
    update = {column: statement.excluded[column] for column in on_conflict}
    session.execute(statement.on_conflict_do_update(index_elements=[Worker.name], set_=update))


def register_worker(session: Session, *, name: str, host: str, kind: str, devices: int) -> None:
    """A worker (re)starting: its row with ``started_at`` and ``last_seen`` now."""
    row = _row(name, host, kind, devices, db_now(session))
    _upsert(session, row, ("host", "kind", "devices", "started_at", "last_seen"))


def beat(session: Session, *, name: str, host: str, kind: str, devices: int) -> None:
    """A running worker's periodic sign of life: ``last_seen`` now (the row is recreated if it was
    lost, e.g. a database restored from a backup, keeping ``started_at`` otherwise)."""
    row = _row(name, host, kind, devices, db_now(session))
    _upsert(session, row, ("host", "kind", "devices", "last_seen"))


def largest_offer(session: Session, kind: str | None, seen_within_s: float) -> int:
    """The most devices one worker of ``kind`` (any kind when None) seen within the last
    ``seen_within_s`` seconds offers; 0 when there is none."""
    since = db_now(session) - timedelta(seconds=seen_within_s)
    query = select(func.max(Worker.devices)).where(Worker.last_seen >= since)
    if kind is not None:
        query = query.where(Worker.kind == kind)
    return int(session.scalar(query) or 0)
