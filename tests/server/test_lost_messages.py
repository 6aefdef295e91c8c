"""Queued runs whose broker message vanished are republished by the reconciler, once.

The real fault (Redis restarted without persistence) is in ``test_reliability_faults``; here the
embedded broker's and Redis' message stores are inspected directly and emptied by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, text

from server.core.config import Settings
from server.jobs.broker_messages import held_task_ids
from server.jobs.reconcile import LostMessages, reconcile_once
from tests.support.services import Api, tiny_job


def _task_ids(api: Api, job_id: int) -> dict[int, str]:
    from server.db.models import Run
    from server.db.session import session_scope

    with session_scope(api.settings.database_url) as session:
        return {run.id: run.task_id for run in session.query(Run).filter(Run.job_id == job_id)}


def _backdate(api: Api, job_id: int) -> None:
    """Make the runs older than the reconciler's grace for freshly published messages."""
    from datetime import timedelta

    from sqlalchemy import update

    from server.db.models import Run
    from server.db.session import session_scope
    from server.db.types import utcnow

    with session_scope(api.settings.database_url) as session:
        session.execute(
            update(Run).where(Run.job_id == job_id).values(queued_at=utcnow() - timedelta(minutes=5))
        )


def test_suspects_must_be_missing_twice_with_the_same_task_id() -> None:
    lost = LostMessages()
    assert lost.confirm({1: "a", 2: "b"}) == []
    assert lost.confirm({1: "a", 2: "c", 3: "d"}) == [1]  # 2 was republished meanwhile: new id
    assert lost.confirm({2: "c"}) == [2]
    assert lost.confirm({}) == [] and lost.suspects == {}


def test_embedded_broker_lost_messages_are_republished_once(sqlite_settings: Settings) -> None:
    api = Api(sqlite_settings)
    job = api.post("/jobs", json=tiny_job()).json()
    published = _task_ids(api, job["id"])
    assert None not in published.values()
    queues = {run["queue"] for run in job["runs"]} if "queue" in job["runs"][0] else {"cpu", "gpu"}
    assert set(published.values()) <= (held_task_ids(sqlite_settings, queues) or set())
    _backdate(api, job["id"])
    lost = LostMessages()
    assert reconcile_once(sqlite_settings, lost=lost).republished == []  # all held: nothing to do

    broker = create_engine(sqlite_settings.broker_url.removeprefix("sqla+"))
    with broker.begin() as conn:
        conn.execute(text("DELETE FROM kombu_message"))
    broker.dispose()
    assert held_task_ids(sqlite_settings, queues) == set()
    assert reconcile_once(sqlite_settings, lost=lost).republished == []  # first sighting only
    second = reconcile_once(sqlite_settings, lost=lost)
    assert sorted(second.republished) == sorted(published)
    republished = _task_ids(api, job["id"])
    assert set(republished.values()).isdisjoint(published.values())
    assert set(republished.values()) <= (held_task_ids(sqlite_settings, queues) or set())
    assert reconcile_once(sqlite_settings, lost=lost).republished == []
    assert reconcile_once(sqlite_settings, lost=lost).republished == []


def test_the_full_scan_is_skipped_while_the_message_count_covers_the_queued_runs(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.jobs.broker_messages as broker_messages

    api = Api(sqlite_settings)
    job = api.post("/jobs", json=tiny_job()).json()
    _backdate(api, job["id"])

    def no_scan(*_: Any) -> set[str]:
        raise AssertionError("full scan while every queued run can still have its message")

    monkeypatch.setattr(broker_messages, "held_task_ids", no_scan)
    lost = LostMessages()
    assert reconcile_once(sqlite_settings, lost=lost).republished == []
    assert reconcile_once(sqlite_settings, lost=lost).republished == []


def test_redis_lost_messages_are_republished_and_an_unreachable_broker_decides_nothing(
    pg_settings: Settings,
) -> None:
    import redis

    api = Api(pg_settings)
    job = api.post("/jobs", json=tiny_job()).json()
    published = _task_ids(api, job["id"])
    queues = {"cpu", "gpu"}
    assert set(published.values()) <= (held_task_ids(pg_settings, queues) or set())
    _backdate(api, job["id"])
    client = redis.Redis.from_url(pg_settings.broker_url)
    for key in client.scan_iter(match=f"{pg_settings.broker_key_prefix}*"):
        if client.type(key) == b"list":
            client.delete(key)
    down = pg_settings.with_(broker_url="redis://127.0.0.1:1/0")
    assert held_task_ids(down, queues) is None
    lost = LostMessages()
    assert reconcile_once(pg_settings, lost=lost).republished == []
    assert reconcile_once(down, lost=lost, enqueue=_never).republished == []  # unknown: no verdict
    assert sorted(reconcile_once(pg_settings, lost=lost).republished) == sorted(published)
    assert reconcile_once(pg_settings, lost=lost).republished == []


def _never(settings: Any, run_id: int, queue: str) -> str:
    raise AssertionError("nothing may be published while the broker cannot be inspected")


def test_stale_messages_of_cancelled_runs_delay_a_lost_message_by_at_most_full_scan_every_passes(
    sqlite_settings: Settings,
) -> None:
    # A cancelled job's messages stay in the broker until a worker drains them; with no worker
    # free they pad the O(1) count, which alone would then never call for the scan.
    from server.jobs.reconcile import FULL_SCAN_EVERY

    api = Api(sqlite_settings)
    cancelled = api.post("/jobs", json=tiny_job()).json()
    assert api.post(f"/jobs/{cancelled['id']}/cancel").status_code == 200
    job = api.post("/jobs", json=tiny_job()).json()
    published = _task_ids(api, job["id"])
    _backdate(api, job["id"])
    broker = create_engine(sqlite_settings.broker_url.removeprefix("sqla+"))
    with broker.begin() as conn:
        for task_id in published.values():
            conn.execute(
                text("DELETE FROM kombu_message WHERE CAST(payload AS TEXT) LIKE :id"), {"id": f"%{task_id}%"}
            )
        stale = conn.execute(text("SELECT count(*) FROM kombu_message WHERE visible")).scalar_one()
    broker.dispose()
    assert stale >= len(published)  # the count covers the queued runs: no reason to scan from it
    lost = LostMessages()
    passes = [reconcile_once(sqlite_settings, lost=lost).republished for _ in range(FULL_SCAN_EVERY + 1)]
    # The tenth pass scans and suspects them, the eleventh confirms and republishes them, once.
    assert passes[:-1] == [[]] * FULL_SCAN_EVERY
    assert sorted(passes[-1]) == sorted(published)
    assert set(_task_ids(api, job["id"]).values()).isdisjoint(published.values())
