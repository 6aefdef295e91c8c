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
from collections.abc import Iterable

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
    url = settings.broker_url
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            return _redis_task_ids(settings, sorted(set(queues)))
        if url.startswith("sqla+"):
            return _sqlalchemy_task_ids(url[len("sqla+") :])
    except Exception as exc:  # broker down: try again next pass
        log.warning("could not inspect the broker's messages: %s", exc)
        return None
    return None


def held_message_count(settings: Settings, queues: Iterable[str]) -> int | None:
    """How many messages the broker holds for ``queues`` (O(1) per key); None when unknown.

    A cheap first look: while it is at least the number of queued runs, no message can be missing
    and the full scan of ``held_task_ids`` is skipped.
    """
    url = settings.broker_url
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            prefix = settings.broker_key_prefix or ""
            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
            try:
                pipe = client.pipeline(transaction=True)
                for key in _redis_queue_keys(prefix, sorted(set(queues))):
                    pipe.llen(key)
                pipe.hlen(prefix + _UNACKED_KEY)
                return int(sum(pipe.execute()))
            finally:
                client.close()
        if url.startswith("sqla+"):
            return len(_sqlalchemy_task_ids(url[len("sqla+") :]))
    except Exception as exc:
        log.warning("could not count the broker's messages: %s", exc)
    return None


def _redis_queue_keys(prefix: str, queues: list[str]) -> list[str]:
    """Each queue's list and its priority sub-queues."""
    keys = []
    for queue in queues:
        keys.append(prefix + queue)
        keys.extend(f"{prefix}{queue}{_PRIORITY_SEPARATOR}{priority}" for priority in range(1, 10))
    return keys


def _ids_in(payloads: Iterable[bytes | str]) -> set[str]:
    found: set[str] = set()
    for payload in payloads:
        raw = payload.encode() if isinstance(payload, str) else payload
        found.update(match.decode() for match in _TASK_ID.findall(raw))
    return found


def _redis_task_ids(settings: Settings, queues: list[str]) -> set[str]:
    import redis

    prefix = settings.broker_key_prefix or ""
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=10)
    try:
        pipe = client.pipeline(transaction=True)  # one snapshot of queues and unacked together
        for key in _redis_queue_keys(prefix, queues):
            pipe.lrange(key, 0, -1)
        pipe.hvals(prefix + _UNACKED_KEY)
        results = pipe.execute()
    finally:
        client.close()
    return _ids_in(payload for batch in results for payload in batch)


def _sqlalchemy_task_ids(url: str) -> set[str]:
    """The embedded broker (kombu's SQLAlchemy transport): messages live in ``kombu_message``."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("kombu_message"):
                return set()
            # Delivered messages stay in the table with visible = false and are never redelivered,
            # so only visible ones still wake a worker up.
            rows = conn.execute(text("SELECT payload FROM kombu_message WHERE visible"))
            return _ids_in(row[0] for row in rows)
    finally:
        engine.dispose()
