"""Publishing runs to the Celery broker by task name: the producer side of the queue.

A run is accepted once its row is committed; its broker message is only a wake-up call for a
worker. The server publishes with ``send_task(TASK_NAME, ...)`` on an app built from ``Settings``
alone, so no worker code (and no torch) is ever imported by the API process. ``worker.celery_app``
registers the consumer under the same name with the same ``celery_config``.

``publish_runs`` is the one place that "publishes, then records the task id": the API after a
submit, the reconciler for runs of dead workers, and a worker for the runs it hands on (the second
stage of a sweep, its own run when it shuts down). A publish that fails leaves ``task_id`` empty;
the reconciler publishes that run later, so nobody waits on a dead broker.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from server.core.config import Settings
from server.crud import runs as runs_crud
from server.db.session import session_scope

log = logging.getLogger(__name__)

# kombu's SQLAlchemy transport (the embedded broker) maps its tables with a loader option that
# SQLAlchemy 2.1 deprecates; every process using it printed that warning, which no user can act on.
warnings.filterwarnings(
    "ignore", message=r"The ``noload`` loader strategy is deprecated", category=DeprecationWarning
)

TASK_NAME = "dykaf.execute_run"
# A publish gives up after about a second: the run stays queued without a task id and the
# reconciler publishes it later, so an API request never hangs on a dead broker.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.3, "interval_max": 0.5}

# ``(settings, run id, queue) -> task id``; tests pass their own to simulate a broker fault.
Enqueue = Callable[[Settings, int, str], str]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Broker and reliability settings shared by producers (API) and consumers (workers)."""
    transport_options: dict[str, Any] = {}
    if settings.broker_is_redis:
        # Unacked messages come back only after this long; it must exceed the longest run.
        transport_options["visibility_timeout"] = settings.visibility_timeout_s
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": "gpu",
        "task_create_missing_queues": True,
        # Ack after the run ends; a worker killed mid-run leaves the message to be redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "result_backend": None,
        # One reserved message per worker process: a second run must not sit behind a long one.
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
    }


def celery_app_for(settings: Settings) -> Celery:
    """A Celery app configured for ``settings`` with no tasks registered (the worker adds its own)."""
    app = Celery("dykaf")
    app.conf.update(celery_config(settings))
    app.conf.dykaf_settings = settings
    return app


@functools.lru_cache(maxsize=8)
def producer_app(settings: Settings) -> Celery:
    """The app used only to publish and revoke; cached per settings (one broker pool each)."""
    return celery_app_for(settings)


def enqueue_run(settings: Settings, run_id: int, queue: str) -> str:
    """Publish the task for one run; returns the Celery task id."""
    result = producer_app(settings).send_task(
        TASK_NAME, args=[run_id], queue=queue, retry=True, retry_policy=PUBLISH_RETRY
    )
    return str(result.id)


def revoke(settings: Settings, task_ids: list[str]) -> None:
    """Best effort: queued runs are already marked cancelled in the DB, so a worker that still
    receives the message does nothing; revoking just saves it the round trip."""
    if not task_ids:
        return
    try:
        producer_app(settings).control.revoke(task_ids)
    except Exception as exc:  # the SQLAlchemy transport has no broadcast support
        log.debug("revoke not delivered: %s", exc)


@dataclass
class Published:
    """What ``publish_runs`` did: task ids of the published runs, errors of the others."""

    task_ids: dict[int, str] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)

    @property
    def run_ids(self) -> list[int]:
        return sorted(self.task_ids)

    def warnings(self) -> list[str]:
        """What the submitter is told: one line when some runs wait for the reconciler, else nothing."""
        if not self.errors:
            return []
        kind = type(next(iter(self.errors.values()))).__name__
        return [f"broker unavailable ({kind}); runs will be queued when it is back"]


def publish_runs(
    settings: Settings, runs: Iterable[tuple[int, str]], *, enqueue: Enqueue | None = None
) -> Published:
    """Publish one task per ``(run id, queue)`` and record each task id on its (still queued) run.

    Call after the runs are committed: a worker may receive the message at once. Failures are
    logged and returned, never raised; those runs keep an empty ``task_id`` for the reconciler.
    """
    send = enqueue or enqueue_run
    published = Published()
    for run_id, queue in runs:
        try:
            published.task_ids[run_id] = send(settings, run_id, queue)
        except Exception as exc:
            log.warning("could not publish run %s: %s (the reconciler retries)", run_id, exc)
            published.errors[run_id] = exc
    if published.task_ids:
        with session_scope(settings.database_url) as session:
            for run_id, task_id in published.task_ids.items():
                runs_crud.set_task_id(session, run_id, task_id)
    return published
