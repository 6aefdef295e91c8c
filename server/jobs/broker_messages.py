"""Which run tasks the broker still holds: lets the reconciler republish messages the broker lost.

A run is accepted once its row is committed; its Celery message is only a wake-up call. Redis
without persistence (or with ``appendfsync everysec`` losing its last second, or a FLUSHALL) can
drop queued messages on restart; the database still says ``queued`` and nothing would ever run
them. The reconciler asks here for the task ids the broker holds (waiting in a queue or delivered
but unacknowledged) and republishes queued runs whose task id is in neither.

Duplicates are harmless by construction: a run is claimed by one conditional UPDATE, so a second
message for the same run finds it running or finished and does nothing (``worker.execute``).
Brokers we cannot inspect answer ``None`` (unknown) and nothing is republished.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from server.core.config import Settings

log = logging.getLogger(__name__)

# Celery task ids are uuid4 strings; message bodies are base64, which has no '-', so a match in a
# raw message is a header (task id, correlation id), never body bytes.
_TASK_ID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# kombu's Redis transport: priority sub-queues are "<queue>\x06\x16<priority>"; messages delivered
# to a worker but not yet acknowledged (acks_late) sit in the "unacked" hash.
_PRIORITY_SEPARATOR = "\x06\x16"
_UNACKED_KEY = "unacked"


def held_task_ids(settings: Settings, queues: Iterable[str]) -> set[str] | None:
    """Task ids of every message the broker holds for ``queues``; None when it cannot be inspected."""
    try:
        if settings.broker_is_redis:
            batches = _redis_snapshot(settings, queues, lambda pipe, key: pipe.lrange(key, 0, -1), "hvals")
            return _ids_in(payload for batch in batches for payload in batch)
        if settings.broker_url.startswith("sqla+"):
            return _ids_in(row[0] for row in _kombu_messages(settings, "payload"))
    except Exception as exc:  # broker down: try again next pass
        log.warning("could not inspect the broker's messages: %s", exc)
    return None


def held_message_count(settings: Settings, queues: Iterable[str]) -> int | None:
    """How many messages the broker holds for ``queues`` (O(1) per Redis key); None when unknown.

    A cheap first look: while it is at least the number of queued runs, no message can be missing
    and the full scan of ``held_task_ids`` is skipped.
    """
    try:
        if settings.broker_is_redis:
            return int(sum(_redis_snapshot(settings, queues, lambda pipe, key: pipe.llen(key), "hlen")))
        if settings.broker_url.startswith("sqla+"):
            rows = _kombu_messages(settings, "count(*)")
            return int(rows[0][0]) if rows else 0
    except Exception as exc:  # broker down: try again next pass
        log.warning("could not count the broker's messages: %s", exc)
    return None


def _redis_snapshot(
    settings: Settings, queues: Iterable[str], per_queue_key: Callable[[Any, str], object], unacked: str
) -> list[Any]:
    """One transaction over every queue key (``per_queue_key``) and the unacked hash (``unacked``
    names the hash command), so that a message moving from a queue to a worker is seen once."""
    import redis

    prefix = settings.broker_key_prefix or ""
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=10)
    try:
        pipe = client.pipeline(transaction=True)
        for queue in sorted(set(queues)):
            per_queue_key(pipe, prefix + queue)
            for priority in range(1, 10):
                per_queue_key(pipe, f"{prefix}{queue}{_PRIORITY_SEPARATOR}{priority}")
        getattr(pipe, unacked)(prefix + _UNACKED_KEY)
        return list(pipe.execute())
    finally:
        client.close()


def _kombu_messages(settings: Settings, columns: str) -> list[Any]:
    """``columns`` of the embedded broker's undelivered messages (kombu's SQLAlchemy transport keeps
    delivered ones with visible = false and never redelivers them, so only visible ones count)."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(settings.broker_url[len("sqla+") :])
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("kombu_message"):
                return []  # no message was ever published
            return list(conn.execute(text(f"SELECT {columns} FROM kombu_message WHERE visible")))
    finally:
        engine.dispose()


def _ids_in(payloads: Iterable[bytes | str]) -> set[str]:
    found: set[str] = set()
    for payload in payloads:
        raw = payload.encode() if isinstance(payload, str) else payload
        found.update(match.decode() for match in _TASK_ID.findall(raw))
    return found
