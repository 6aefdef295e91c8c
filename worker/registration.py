"""The worker's entry in the workers registry: what it offers, kept fresh while it runs.

The API refuses a run on more devices than any recently seen worker offers
(``server.api.routes.jobs.check_devices``); for that every worker registers when Celery says it is
ready and then beats every ``BEAT_S`` from a daemon thread. A worker owning GPUs is kind ``cuda``
with one device per GPU; any other is kind ``cpu`` with ``worker_cpu_ranks`` devices. A database
that is briefly unreachable costs a missed beat, never the worker.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

from server.core.config import Settings
from server.crud import workers as workers_crud
from server.db.session import session_scope

log = logging.getLogger(__name__)

# Far below the default ``worker_seen_s`` (an hour), so a missed beat or two changes nothing.
BEAT_S = 30.0


@dataclass(frozen=True)
class Offer:
    """What one worker process declares: its name (the Celery node name), host, kind and devices."""

    name: str
    host: str
    kind: str
    devices: int


def offer_of(settings: Settings, name: str) -> Offer:
    gpus = settings.gpu_indices
    kind, devices = ("cuda", len(gpus)) if gpus else ("cpu", settings.worker_cpu_ranks)
    return Offer(name=name, host=socket.gethostname(), kind=kind, devices=devices)


def register(settings: Settings, offer: Offer) -> None:
    with session_scope(settings.database_url) as session:
        workers_crud.register_worker(
            session, name=offer.name, host=offer.host, kind=offer.kind, devices=offer.devices
        )


def beat(settings: Settings, offer: Offer) -> None:
    with session_scope(settings.database_url) as session:
        workers_crud.beat(session, name=offer.name, host=offer.host, kind=offer.kind, devices=offer.devices)


def run_registration(
    settings: Settings, offer: Offer, stop: threading.Event, every_s: float = BEAT_S
) -> None:
    """Register, then beat every ``every_s`` until ``stop``; failures are logged and retried."""
    registered = False
    while True:
        try:
            if registered:
                beat(settings, offer)
            else:
                register(settings, offer)
                registered = True
                log.info("registered as %s: %d %s device(s)", offer.name, offer.devices, offer.kind)
        except Exception as exc:  # the database may be restarting: try again at the next beat
            log.warning("worker registration of %s failed: %s", offer.name, exc)
        if stop.wait(every_s):
            return


def start_registration_thread(settings: Settings, offer: Offer, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(
        target=run_registration, args=(settings, offer, stop), name="dykaf-registration", daemon=True
    )
    thread.start()
    return thread
