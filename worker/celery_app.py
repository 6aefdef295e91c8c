"""The Celery application: one task per run, late acks, one run at a time per worker process.

Start a worker with ``dykaf-lab worker`` (which picks the pool and queues) or directly:
``celery -A worker.celery_app worker -P solo -Q gpu --prefetch-multiplier 1``.

Importing this module must stay cheap and must never import torch: the API process imports it to
enqueue tasks, and a GPU worker must not touch CUDA before its pool is set up.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from typing import Any

from celery import Celery, signals

from server.core.config import Settings

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
QUEUES = ("gpu", "cpu")


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


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("dykaf")
    app.conf.update(celery_config(settings))
    app.conf.dykaf_settings = settings

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def execute_run_task(self: Any, run_id: int) -> str:
        """Run ``run_id`` if this worker can claim it (a no-op for redeliveries)."""
        from worker.execute import run_task

        return run_task(int(run_id), app.conf.dykaf_settings, task_id=self.request.id)

    return app


@functools.lru_cache(maxsize=8)
def producer_app(settings: Settings) -> Celery:
    """A Celery app used only to publish (API, reconciler); cached per settings."""
    return create_celery_app(settings)


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


app = create_celery_app(Settings.from_env())

_reconciler_stop = threading.Event()


@signals.worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    """Each worker also runs the (idempotent) stale-run reconciler, so a cluster without an API
    process, or one whose API is down, still recovers runs of dead workers."""
    settings: Settings = getattr(sender, "app", app).conf.dykaf_settings
    if not settings.reconcile:
        return
    from server.jobs.reconcile import start_reconciler_thread

    start_reconciler_thread(settings, _reconciler_stop)


@signals.worker_shutting_down.connect
def _on_shutting_down(sender: Any = None, **_: Any) -> None:
    """Ask the run in progress to checkpoint and requeue itself so the shutdown is prompt."""
    from worker.execute import SHUTDOWN

    SHUTDOWN.set()


@signals.worker_shutdown.connect
def _stop_reconciler(sender: Any = None, **_: Any) -> None:
    _reconciler_stop.set()
