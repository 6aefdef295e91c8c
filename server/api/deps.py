"""FastAPI dependencies: the app's settings and a DB session per request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Path, Request
from pydantic import Field
from sqlalchemy.orm import Session

from server.core.config import Settings
from server.db.session import session_factory

# Ids and steps are BIGINT/INTEGER columns: a number outside 64 bits is a 422 naming the parameter,
# never a driver overflow (500).
DB_INT_MAX = 2**63 - 1
JobId = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="job id")]
RunIdItem = Annotated[int, Field(ge=1, le=DB_INT_MAX)]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session closed after the response; endpoints commit explicitly."""
    session = session_factory(request.app.state.settings.database_url)()
    try:
        yield session
    finally:
        session.close()
