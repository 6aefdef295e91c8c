"""Bearer-key authentication for the REST API.

Writes always need ``Authorization: Bearer <key>``; reads need it only when
``DYKAF_READS_REQUIRE_KEY`` is set. Keys are verified against their stored SHA-256 with a
constant-time comparison (see ``server.crud.api_keys``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from server.api.deps import get_session, get_settings
from server.core.config import Settings
from server.crud.api_keys import touch_last_used, verify_token
from server.db.models import ApiKey
from server.errors import ApiError
from server.ratelimit import retry_after_header

bearer = HTTPBearer(auto_error=False, description="An API key created with `dykaf-lab keys create`")


def _unauthorized(msg: str) -> ApiError:
    return ApiError(
        401,
        msg,
        loc=["header", "Authorization"],
        type_="unauthorized",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _check(session: Session, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key = verify_token(session, credentials.credentials)
    if key is None:
        raise _unauthorized("invalid or revoked API key")
    touch_last_used(session.get_bind(), key)  # type: ignore[arg-type]
    return key


def require_key(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """Dependency for write endpoints: a valid key, within its write rate (``server.ratelimit``)."""
    key = _check(session, credentials)
    request.state.api_key_id = key.id
    limiter = getattr(request.app.state, "write_limiter", None)
    if limiter is not None:
        wait = limiter.acquire(key.id)
        if wait > 0:
            retry_after = retry_after_header(wait)  # the message says what the header says
            raise ApiError(
                429,
                f"write rate limit of {limiter.rate_per_min:g} per minute exceeded for this API key; "
                f"retry in {retry_after} s",
                loc=["header", "Authorization"],
                type_="rate_limited",
                headers={"Retry-After": retry_after},
            )
    return key


def read_access(
    settings: Annotated[Settings, Depends(get_settings)],
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Dependency for read endpoints: open unless the deployment requires keys for reads."""
    if settings.reads_require_key:
        _check(session, credentials)
