"""Periodic reconciliation: give runs of dead workers (and never-enqueued runs) back to the queue.

A worker heartbeats its run; when the heartbeat is older than ``stale_after_s`` the worker is
presumed dead (killed, OOM, machine lost) and the run goes back to ``queued`` with a fresh broker
message; the next worker claims it and resumes from the run's last checkpoint. Every step is a
conditional UPDATE, so any number of reconcilers (API replicas, workers) can run concurrently and
a run is requeued once. Runs whose submit-time publish failed (broker down) have no task id and
are published here once the broker is back. Queued runs whose message the broker lost (Redis
restarted without persistence) are republished once two passes in a row found their task id
missing from the broker (``server.jobs.broker_messages``; a message in flight between queue and
worker is missing for an instant, never for a whole pass interval). The full scan runs when the
broker holds fewer messages than there are queued runs (an O(1) count first), while there are
suspects to confirm, and at least every ``FULL_SCAN_EVERY`` passes: messages of cancelled runs stay
in the broker until a worker drains them, and without that bound they could pad the count and hide
a lost message for as long as no worker is free. A republished run can at worst get two messages;
the claim lets only one of them run it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from server.core.config import Settings
from server.crud import rollups as rollups_crud
from server.crud import runs as runs_crud
from server.db.session import session_scope
from server.db.types import utcnow
from server.jobs import broker_messages
from server.jobs.publish import Enqueue, publish_runs

log = logging.getLogger(__name__)

# A freshly submitted run gets its task id milliseconds after commit; only older ones are orphans.
UNENQUEUED_GRACE_S = 10.0

# Passes between full scans of the broker even when its message count looks complete (stale
# messages of cancelled runs can make it so): the longest a lost message stays undetected
# (≈ 100 s at the default reconcile_every_s of 10 s, plus one pass to confirm).
FULL_SCAN_EVERY = 10


@dataclass
class ReconcileReport:
    requeued: list[int]
    enqueued: list[int]
    rolled_up: list[int]
    republished: list[int] = field(default_factory=list)


@dataclass
class LostMessages:
    """Queued runs whose message the broker did not hold at the last pass: ``run id → task id``.

    A run is republished only when a second pass finds the same task id still missing.
    """

    suspects: dict[int, str] = field(default_factory=dict)
    # Passes since the last full scan of the broker's messages.
    passes_since_scan: int = 0

    def scan_due(self) -> bool:
        """Whether this pass must scan even if the message count covers the queued runs."""
        return bool(self.suspects) or self.passes_since_scan + 1 >= FULL_SCAN_EVERY

    def confirm(self, missing: dict[int, str]) -> list[int]:
        """Record this pass's missing runs; return those missing (same task id) last pass too."""
        lost = [run_id for run_id, task_id in missing.items() if self.suspects.get(run_id) == task_id]
        self.suspects = {run_id: task for run_id, task in missing.items() if run_id not in lost}
        return sorted(lost)


def _publish(settings: Settings, run_ids: list[int], enqueue: Enqueue | None) -> list[int]:
    """Publish runs known by id only (runs deleted meanwhile are skipped); returns those published."""
    with session_scope(settings.database_url) as session:
        queues = runs_crud.run_queues(session, run_ids)
    return publish_runs(settings, sorted(queues.items()), enqueue=enqueue).run_ids


def reconcile_once(
    settings: Settings, enqueue: Enqueue | None = None, lost: LostMessages | None = None
) -> ReconcileReport:
    """One pass: requeue stale running runs, publish queued runs that have no broker message.

    ``lost`` carries the lost-message suspects from the previous pass (``run_forever`` keeps one);
    without it no lost message is republished, since that needs two passes' agreement.
    """
    now = utcnow()
    with session_scope(settings.database_url) as session:
        requeued = runs_crud.requeue_stale(session, settings.stale_after_s)
    if requeued:
        log.warning("requeued runs with stale heartbeats: %s", requeued)
    with session_scope(settings.database_url) as session:
        orphans = runs_crud.unenqueued_runs(session, now - timedelta(seconds=UNENQUEUED_GRACE_S))
    republish = _lost_message_runs(settings, lost, now) if lost is not None else []
    if republish:
        log.warning("republishing queued runs whose broker message was lost: %s", republish)
    to_publish = sorted(set(requeued) | set(orphans) | set(republish))
    enqueued = _publish(settings, to_publish, enqueue)
    return ReconcileReport(
        requeued=requeued,
        enqueued=enqueued,
        rolled_up=backfill_rollups(settings),
        republished=[run_id for run_id in republish if run_id in enqueued],
    )


def _lost_message_runs(settings: Settings, lost: LostMessages, now: datetime) -> list[int]:
    """Queued runs whose task id the broker has not held for two passes in a row."""
    with session_scope(settings.database_url) as session:
        published = runs_crud.enqueued_runs(session, now - timedelta(seconds=UNENQUEUED_GRACE_S))
    if not published:
        lost.confirm({})
        lost.passes_since_scan = 0  # nothing queued: nothing a later scan could find
        return []
    queues = {queue for _, _, queue in published}
    count = broker_messages.held_message_count(settings, queues)
    if count is not None and count >= len(published) and not lost.scan_due():
        # Every queued run can still have its message (the usual case): skip the full scan.
        lost.passes_since_scan += 1
        return []
    held = broker_messages.held_task_ids(settings, queues)
    if held is None:  # broker down or not inspectable: decide nothing this pass
        return []
    lost.passes_since_scan = 0
    return lost.confirm({run_id: task_id for run_id, task_id, _ in published if task_id not in held})


def backfill_rollups(settings: Settings, limit: int = 5) -> list[int]:
    """Roll up runs that ended without rollups (their worker died right after finishing them).

    Runs that ended less than a minute ago are left to their own worker, which builds them right
    after finishing; doing it here too would only duplicate the work.
    """
    with session_scope(settings.database_url) as session:
        run_ids = rollups_crud.runs_missing_rollups(session, utcnow() - timedelta(seconds=60), limit)
    return [run_id for run_id in run_ids if rollups_crud.build_rollups_safely(settings.database_url, run_id)]


def run_forever(settings: Settings, stop: threading.Event, enqueue: Enqueue | None = None) -> None:
    lost = LostMessages()
    while not stop.wait(settings.reconcile_every_s):
        try:
            reconcile_once(settings, enqueue, lost)
        except Exception:  # keep reconciling through transient DB/broker outages
            log.exception("reconcile pass failed")


def start_reconciler_thread(settings: Settings, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=run_forever, args=(settings, stop), name="dykaf-reconciler", daemon=True)
    thread.start()
    return thread
