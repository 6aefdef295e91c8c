"""API keys: generate, verify (constant-time), revoke.

A key is ``dykaf_<43 url-safe chars>`` (256 bits from ``secrets``). Only its SHA-256 is stored:
a leaked database does not leak usable keys, and a fast hash is enough because the token is
high-entropy (no password stretching needed). Lookup narrows by the non-secret prefix, then the
hashes are compared with ``hmac.compare_digest`` so timing does not reveal how much matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from server.db.models import ApiKey
from server.db.types import utcnow

TOKEN_PREFIX = "dykaf_"
PREFIX_LEN = 12  # "dykaf_" + 6 random characters: shown in listings, not a secret
# ``last_used_at`` is refreshed at most this often per key: an audit hint ("is this key still in
# use?" before revoking it), not a per-request write.
LAST_USED_RESOLUTION_S = 60.0

log = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """Store a new key; returns the row and the plaintext token (shown once, never stored)."""
    token = generate_token()
    key = ApiKey(name=name, prefix=token[:PREFIX_LEN], key_hash=hash_token(token))
    session.add(key)
    session.flush()
    return key, token


def verify_token(session: Session, token: str) -> ApiKey | None:
    """The active key matching ``token``, or None (unknown, malformed or revoked)."""
    if not token or len(token) > 256:
        return None
    digest = hash_token(token)
    candidates = session.scalars(
        select(ApiKey).where(ApiKey.prefix == token[:PREFIX_LEN], ApiKey.revoked_at.is_(None))
    ).all()
    match = None
    for key in candidates:
        if hmac.compare_digest(key.key_hash, digest):
            match = key
    return match


def revoke_key(session: Session, ident: str) -> int:
    """Revoke by numeric id, prefix or the full token; returns how many keys were revoked."""
    query = update(ApiKey).where(ApiKey.revoked_at.is_(None))
    if ident.isdigit():
        query = query.where(ApiKey.id == int(ident))
    elif ident.startswith(TOKEN_PREFIX) and len(ident) > PREFIX_LEN:
        query = query.where(ApiKey.key_hash == hash_token(ident))
    else:
        query = query.where(ApiKey.prefix == ident)
    return session.execute(query.values(revoked_at=utcnow())).rowcount or 0


def touch_last_used(engine: Engine, key: ApiKey, resolution_s: float = LAST_USED_RESOLUTION_S) -> None:
    """Record that ``key`` (the row just verified) was used, unless that is already recorded within
    ``resolution_s``: most requests read that from the row and touch nothing.

    Its own short transaction (never the request's), conditional so that concurrent requests write
    once, and never fatal: a failure here must not fail the request it accounts for.
    """
    now = utcnow()
    recent = now - timedelta(seconds=resolution_s)
    if key.last_used_at is not None and key.last_used_at >= recent:
        return
    try:
        with engine.begin() as conn:
            conn.execute(
                update(ApiKey)
                .where(
                    ApiKey.id == key.id,
                    or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < recent),
                )
                .values(last_used_at=now)
            )
    except Exception as exc:  # bookkeeping only
        log.warning("could not record the use of API key %s: %s", key.id, exc)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)).all())
