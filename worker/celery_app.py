"""The Celery consumer: one task per run, late acks, registered in the workers registry.

Start a worker with ``dykaf-lab worker`` (which picks the pool and queues) or directly:
``celery -A worker.celery_app worker -P solo -Q gpu --prefetch-multiplier 1``.

The broker settings and the task's name come from ``server.jobs.publish``, where the API publishes
runs by that name without importing this module. Importing this module must stay cheap and must
never import torch: a GPU worker must not touch CUDA before its pool is set up (``worker.execute``
imports the training code inside the task).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, signals

from server.core.config import Settings
from server.jobs.publish import TASK_NAME, celery_app_for
from server.jobs.reconcile import start_reconciler_thread
from worker.execute import SHUTDOWN, run_task
from worker.registration import offer_of, start_registration_thread


def create_celery_app(settings: Settings) -> Celery:
    """The worker's app: the producer configuration plus the task that executes a run."""
    app = celery_app_for(settings)

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def execute_run_task(self: Any, run_id: int) -> str:
        """Run ``run_id`` if this worker can claim it (a no-op for redeliveries)."""
        return run_task(int(run_id), app.conf.dykaf_settings, task_id=self.request.id)

    return app


app = create_celery_app(Settings.from_env())

_reconciler_stop = threading.Event()
_registration_stop = threading.Event()


@signals.worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    """Each worker also runs the (idempotent) stale-run reconciler, so a cluster without an API
    process, or one whose API is down, still recovers runs of dead workers."""
    settings: Settings = getattr(sender, "app", app).conf.dykaf_settings
    if settings.reconcile:
        start_reconciler_thread(settings, _reconciler_stop)


@signals.worker_ready.connect
def _start_registration(sender: Any = None, **_: Any) -> None:
    """Enter the workers registry under the Celery node name (``sender`` is the consumer) and keep
    the entry fresh, so the API knows how many devices this worker offers."""
    settings: Settings = getattr(sender, "app", app).conf.dykaf_settings
    name = str(getattr(sender, "hostname", "") or "worker")
    start_registration_thread(settings, offer_of(settings, name), _registration_stop)


@signals.worker_shutting_down.connect
def _on_shutting_down(sender: Any = None, **_: Any) -> None:
    """Ask the run in progress to checkpoint and requeue itself so the shutdown is prompt."""
    SHUTDOWN.set()


@signals.worker_shutdown.connect
def _stop_reconciler(sender: Any = None, **_: Any) -> None:
    _reconciler_stop.set()
    _registration_stop.set()
