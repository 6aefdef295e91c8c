"""FastAPI dependencies: the app's settings and a DB session per request."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

from server.core.config import Settings
from server.db.session import session_factory


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session closed after the response; endpoints commit explicitly."""
    session = session_factory(request.app.state.settings.database_url)()
    try:
        yield session
    finally:
        session.close()
