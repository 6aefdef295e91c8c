"""Periodic reconciliation: give runs of dead workers (and never-enqueued runs) back to the queue.

A worker heartbeats its run; when the heartbeat is older than ``stale_after_s`` the worker is
presumed dead (killed, OOM, machine lost) and the run goes back to ``queued`` with a fresh broker
message; the next worker claims it and resumes from the run's last checkpoint. Every step is a
conditional UPDATE, so any number of reconcilers (API replicas, workers) can run concurrently and
a run is requeued once. Runs whose submit-time publish failed (broker down) have no task id and
are published here once the broker is back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from server.core.config import Settings
from server.crud import runs as runs_crud
from server.db.session import session_scope
from server.db.types import utcnow

log = logging.getLogger(__name__)

# A freshly submitted run gets its task id milliseconds after commit; only older ones are orphans.
UNENQUEUED_GRACE_S = 10.0

Enqueue = Callable[[Settings, int, str], str]


@dataclass
class ReconcileReport:
    requeued: list[int]
    enqueued: list[int]
    rolled_up: list[int]


def _publish(settings: Settings, run_ids: list[int], enqueue: Enqueue) -> list[int]:
    done = []
    for run_id in run_ids:
        with session_scope(settings.database_url) as session:
            queue = runs_crud.run_queue(session, run_id)
        if queue is None:
            continue
        try:
            task_id = enqueue(settings, run_id, queue)
        except Exception as exc:
            log.warning("could not publish run %s: %s (will retry)", run_id, exc)
            continue
        with session_scope(settings.database_url) as session:
            runs_crud.set_task_id(session, run_id, task_id)
        done.append(run_id)
    return done


def reconcile_once(settings: Settings, enqueue: Enqueue | None = None) -> ReconcileReport:
    """One pass: requeue stale running runs, publish queued runs that have no broker message."""
    if enqueue is None:
        from worker.celery_app import enqueue_run

        enqueue = enqueue_run
    now = utcnow()
    with session_scope(settings.database_url) as session:
        requeued = runs_crud.requeue_stale(session, now - timedelta(seconds=settings.stale_after_s))
    if requeued:
        log.warning("requeued runs with stale heartbeats: %s", requeued)
    with session_scope(settings.database_url) as session:
        orphans = runs_crud.unenqueued_runs(session, now - timedelta(seconds=UNENQUEUED_GRACE_S))
    to_publish = sorted(set(requeued) | set(orphans))
    enqueued = _publish(settings, to_publish, enqueue)
    return ReconcileReport(requeued=requeued, enqueued=enqueued, rolled_up=backfill_rollups(settings))


def backfill_rollups(settings: Settings, limit: int = 5) -> list[int]:
    """Roll up runs that ended without rollups (their worker died right after finishing them).

    Runs that ended less than a minute ago are left to their own worker, which builds them right
    after finishing; doing it here too would only duplicate the work.
    """
    from sqlalchemy import select

    from server.crud.rollups import build_rollups_safely
    from server.db.models import TERMINAL, Run
    from server.db.session import get_engine

    cutoff = utcnow() - timedelta(seconds=60)
    with get_engine(settings.database_url).connect() as conn:
        run_ids = list(
            conn.execute(
                select(Run.id)
                .where(
                    Run.status.in_(sorted(TERMINAL)), Run.rollup_built.is_(False), Run.finished_at < cutoff
                )
                .order_by(Run.id)
                .limit(limit)
            ).scalars()
        )
    return [run_id for run_id in run_ids if build_rollups_safely(settings.database_url, run_id)]


def run_forever(settings: Settings, stop: threading.Event, enqueue: Enqueue | None = None) -> None:
    while not stop.wait(settings.reconcile_every_s):
        try:
            reconcile_once(settings, enqueue)
        except Exception:  # keep reconciling through transient DB/broker outages
            log.exception("reconcile pass failed")


def start_reconciler_thread(settings: Settings, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=run_forever, args=(settings, stop), name="dykaf-reconciler", daemon=True)
    thread.start()
    return thread
