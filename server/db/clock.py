"""The database's clock: the one time source every machine of a cluster shares.

Heartbeats are written by workers and judged stale by reconcilers on other machines; with each
side reading its own clock, a worker whose clock runs 40 s behind looks dead to everyone else
(and one running ahead hides a dead worker). On PostgreSQL both the write and the check therefore
use the server's ``now()``. SQLite is embedded: one machine, one clock, so its local time is used.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.types import utcnow


def db_now(session: Session) -> datetime:
    """Timezone-aware current time from the database server (PostgreSQL) or this machine (SQLite)."""
    if session.get_bind().dialect.name != "postgresql":
        return utcnow()
    value = session.scalar(select(func.now()))
    if value is None:  # pragma: no cover - now() is never NULL
        return utcnow()
    return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
