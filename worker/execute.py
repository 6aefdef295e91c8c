"""Execute one run inside a Celery task: claim, heartbeat, stream metrics to the DB, finish.

The flow is built so that every failure mode converges on a correct final state:

* redelivered task → the claim fails (run running with a fresh heartbeat, or already ended) → no-op;
* worker killed → heartbeats stop → the reconciler requeues the run → the next claim resumes from
  the newest checkpoint under ``DATA_DIR/checkpoints/<run_id>``; metric points replayed after the
  checkpoint hit the primary key and are dropped (``ON CONFLICT DO NOTHING``): no gaps, no dupes;
* this worker stalls long enough to lose the run → its heartbeat sees ``attempt`` changed, it stops
  training and writes nothing further (every write is fenced by ``attempt``);
* cancel → the API sets ``cancel_requested``; the heartbeat thread polls it and ``should_cancel``
  returns True between steps; the runner checkpoints and returns ``cancelled``; metrics stay.

A run on several devices (``task.devices_per_run`` > 1), and every run of a worker that owns several
GPUs, trains in torchrun-started rank processes on devices taken from the worker's pool
(``worker.devices``); this process then only supervises (``worker.distributed.launch``): claim,
heartbeat, cancel and the final state work exactly as above, and rank 0 streams the metrics.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

from server.core.config import Settings
from server.crud import runs as runs_crud
from server.crud.metrics import FisherRowT, MetricRow, insert_fisher, insert_metrics
from server.crud.rollups import build_rollups_safely
from server.db.models import Run
from server.db.session import get_engine, session_scope
from server.jobs.publish import publish_runs
from server.jobs.spec import RunSpec
from server.jobs.status import TERMINAL, RunStatus
from worker.devices import AcquireStopped, node_pool

log = logging.getLogger(__name__)

# Set when the worker process is asked to stop (SIGTERM/SIGINT): the run in progress checkpoints,
# goes back to the queue and resumes on the next worker instead of blocking the shutdown.
SHUTDOWN = threading.Event()


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying with the same data: lost connections, lock timeouts, restarts."""
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class CheckpointAlignment:
    """Says when the sink must flush so that no checkpoint is ever ahead of the stored metrics.

    The runner saves a checkpoint every ``checkpoint_every`` steps and at the end, after logging
    that step's metrics and Fisher rows. If a checkpoint at step ``c`` were written while points
    of steps ≤ ``c`` still sat in this buffer, a worker killed right then would resume from ``c``
    and never log those points again: a gap. So the buffer is flushed at the last log call before
    every checkpoint step (a log call at step ``s`` flushes when a save falls in
    ``[s, next possible log call)``).
    """

    def __init__(self, task: Any) -> None:
        self.steps = int(task.steps)
        self.checkpoint_every = int(task.checkpoint_every)
        self.cadences = [c for c in (task.log_every, task.eval_every, task.fisher_every) if c and c > 0]

    def _next_event(self, step: int) -> int:
        nxt = [(step // c + 1) * c for c in self.cadences]
        return min([*nxt, self.steps]) if step < self.steps else step + 1

    def _has_save(self, lo: int, hi: int) -> bool:
        """A checkpoint step in ``[lo, hi)``?"""
        if lo <= self.steps < hi:
            return True
        if self.checkpoint_every <= 0 or hi <= lo:
            return False
        first = -(-lo // self.checkpoint_every) * self.checkpoint_every
        return first < hi and first >= max(lo, 1)

    def must_flush(self, step: int) -> bool:
        return self._has_save(step, max(self._next_event(step), step + 1))


class DatabaseSink:
    """``MetricSink`` writing to the service DB in batches.

    Points are buffered and written with one statement per flush (every ``flush_every_points``
    points or ``flush_every_s`` seconds, and on ``flush``/``close``), never one round trip per
    point. A transient DB error keeps the buffer and retries with exponential backoff, so a DB
    restart during training loses nothing; only a persistent failure propagates.
    """

    def __init__(
        self,
        engine: Engine,
        run_id: int,
        *,
        flush_every_points: int = 2000,
        flush_every_s: float = 2.0,
        max_retries: int = 8,
        backoff_s: float = 0.25,
    ) -> None:
        self.engine = engine
        self.run_id = run_id
        self.flush_every_points = max(1, flush_every_points)
        self.flush_every_s = flush_every_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._metrics: list[MetricRow] = []
        self._fisher: list[FisherRowT] = []
        self._last_flush = time.monotonic()
        self.last_step: int | None = None
        self.flushes = 0
        self.retries = 0
        self.alignment: CheckpointAlignment | None = None

    def log_metrics(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None:
        step = int(step)
        for name, value in metrics.items():
            if value is None:
                continue
            self._metrics.append((self.run_id, str(name), step, float(value), float(wall_time)))
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        self._maybe_flush(step)

    def log_fisher(self, rows: Iterable[Sequence[Any]]) -> None:
        step = None
        for step, layer, method, metric, value in rows:
            self._fisher.append(
                (
                    self.run_id,
                    int(step),
                    str(layer),
                    str(method),
                    str(metric),
                    None if value is None else float(value),
                )
            )
        self._maybe_flush(step)

    def _maybe_flush(self, step: int | None) -> None:
        pending = len(self._metrics) + len(self._fisher)
        aligned = self.alignment is not None and step is not None and self.alignment.must_flush(int(step))
        if (
            pending >= self.flush_every_points
            or aligned
            or (pending and time.monotonic() - self._last_flush >= self.flush_every_s)
        ):
            self.flush()

    def flush(self) -> None:
        if not self._metrics and not self._fisher:
            self._last_flush = time.monotonic()
            return
        attempt = 0
        while True:
            try:
                with self.engine.begin() as conn:
                    insert_metrics(conn, self._metrics)
                    insert_fisher(conn, self._fisher)
                break
            except DBAPIError as exc:
                if not is_transient(exc) or attempt >= self.max_retries:
                    raise
                attempt += 1
                self.retries += 1
                delay = min(self.backoff_s * 2 ** (attempt - 1), 10.0)
                log.warning(
                    "metric flush failed (%s); retry %d in %.2fs", exc.__class__.__name__, attempt, delay
                )
                time.sleep(delay)
        self._metrics.clear()
        self._fisher.clear()
        self.flushes += 1
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    @property
    def pending(self) -> int:
        return len(self._metrics) + len(self._fisher)


def database_sink(settings: Settings, run_id: int, task: Any = None) -> DatabaseSink:
    """The sink of a run's metrics in the service: this worker's, or rank 0's of a multi-device run.
    With ``task`` it flushes before every checkpoint (``CheckpointAlignment``)."""
    sink = DatabaseSink(
        get_engine(settings.database_url),
        run_id,
        flush_every_points=settings.flush_every_points,
        flush_every_s=settings.flush_every_s,
    )
    if task is not None:
        sink.alignment = CheckpointAlignment(task)
    return sink


class Heartbeat(threading.Thread):
    """Refreshes the run's heartbeat and progress, and watches for cancel and lost ownership.

    Polls every ``min(heartbeat_s, 1)`` seconds so a cancel takes effect within about a second
    plus one training step.
    """

    def __init__(self, settings: Settings, claim: runs_crud.Claim, sink: DatabaseSink) -> None:
        super().__init__(name=f"heartbeat-run-{claim.run_id}", daemon=True)
        self.settings = settings
        self.claim = claim
        self.sink = sink
        self.progress_step: int | None = None
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop_event = threading.Event()
        self.interval = max(0.05, min(settings.heartbeat_s, 1.0))

    def beat(self) -> None:
        step = self.progress_step if self.progress_step is not None else self.sink.last_step
        with session_scope(self.settings.database_url) as session:
            owned, cancel = runs_crud.heartbeat(session, self.claim.run_id, self.claim.attempt, step)
        if not owned and not self.lost.is_set():
            log.warning(
                "run %s attempt %d is no longer ours (requeued or ended elsewhere)",
                self.claim.run_id,
                self.claim.attempt,
            )
            self.lost.set()
        if cancel:
            self.cancel.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # a DB blip must not kill the thread
                log.warning("heartbeat for run %s failed: %s", self.claim.run_id, exc)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def device_label(spec_device: str, worker_device: str | None, devices: list[str] | None = None) -> str:
    """The device a run will use (``cuda:2,5`` for two of a node's GPUs, ``cpu×2`` for two CPU
    ranks); checked in the child only (never before a pool forks)."""
    if devices is not None:
        if all(device.isdigit() for device in devices):
            return f"cuda:{','.join(devices)}"
        return f"cpu×{len(devices)}"
    if worker_device:
        return worker_device
    if spec_device in ("cpu", "cuda"):
        return spec_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _latest_checkpoint_step(directory: Path) -> int | None:
    """Step of the newest checkpoint a new attempt will resume from (None: starts from scratch)."""
    from worker.training.checkpoint import list_checkpoints  # imports torch: inside the task only

    found = list_checkpoints(directory)
    return found[-1][0] if found else None


def _finite_summary(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """JSON (and PostgreSQL's JSONB) has no NaN/inf: store them as null."""
    if summary is None:
        return None
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[str(key)] = None
        else:
            out[str(key)] = value
    return out


def run_task(run_id: int, settings: Settings, *, task_id: str | None = None) -> str:
    """Entry point of the Celery task; returns what happened (for logs and tests)."""
    # Heavy imports (torch, the model code) happen here, inside the task, so that importing the
    # Celery app stays cheap and torch never loads before the pool is set up; and they happen before
    # the claim: between the claim and the first heartbeat there must be nothing slow, or a loaded
    # machine makes the run look orphaned.
    import worker.training.runner  # noqa: F401

    if SHUTDOWN.is_set():
        # A message received while this worker drains for shutdown goes back to the broker
        # unacknowledged, for another worker or the next start.
        from celery.exceptions import Reject

        raise Reject("worker is shutting down", requeue=True)

    with session_scope(settings.database_url) as session:
        row = session.get(Run, run_id)
        stored = (row.spec or {}) if row is not None else {}
        ended = row is None or row.status in TERMINAL
    if ended:
        log.info("run %s not claimable (deleted or already ended)", run_id)
        return "skipped"
    needed = int(stored.get("task", {}).get("devices_per_run", 1))
    # Devices first, the claim second: a run waiting for a busy node's GPUs stays "queued".
    with held_devices(settings, needed) as devices:
        device = device_label(stored.get("device", "auto"), settings.worker_device, devices)
        with session_scope(settings.database_url) as session:
            claim = runs_crud.claim_run(
                session, run_id, worker=worker_name(), device=device, stale_after_s=settings.stale_after_s
            )
        if claim is None:
            log.info("run %s not claimable (already running elsewhere, finished or cancelled)", run_id)
            return "skipped"
        log.info("run %s claimed (attempt %d, task %s)", run_id, claim.attempt, task_id)
        return execute_claimed(claim, settings, device=device, devices=devices)


@contextlib.contextmanager
def held_devices(settings: Settings, needed: int) -> Iterator[list[str] | None]:
    """The devices a run on ranks holds while it trains (None: it trains in this process).

    Runs go to ranks when they need several devices, or on a worker owning several GPUs (whose runs
    must not share this process). Waiting for them ends when the worker shuts down: the message then
    goes back to the broker.
    """
    if needed <= 1 and len(settings.gpu_indices) <= 1:
        yield None
        return
    from celery.exceptions import Reject

    try:
        with node_pool(settings).acquire(needed, stop=SHUTDOWN) as devices:
            yield devices
    except AcquireStopped:
        raise Reject("worker is shutting down", requeue=True) from None


def execute_claimed(
    claim: runs_crud.Claim, settings: Settings, *, device: str | None, devices: list[str] | None = None
) -> str:
    # torch and the model code: imported inside the task only (see ``run_task``).
    from worker.training.runner import execute_run

    sink = database_sink(settings, claim.run_id)
    heartbeat = Heartbeat(settings, claim, sink)
    heartbeat.start()
    checkpoint_dir = settings.checkpoint_root / str(claim.run_id)
    resumed_from = _latest_checkpoint_step(checkpoint_dir)
    if resumed_from is not None:
        log.info(
            "run %s attempt %d resumes from the checkpoint of step %d",
            claim.run_id,
            claim.attempt,
            resumed_from,
        )
    started = time.monotonic()

    def should_cancel() -> bool:
        return heartbeat.cancel.is_set() or heartbeat.lost.is_set() or SHUTDOWN.is_set()

    def progress(*args: Any, **kwargs: Any) -> None:
        step = kwargs.get("step", args[0] if args else None)
        step = getattr(step, "step", step)
        if isinstance(step, int):
            heartbeat.progress_step = step

    status, reason, final_step, summary, error = RunStatus.FAILED, None, None, None, None
    try:
        spec = RunSpec.model_validate(claim.spec)
        sink.alignment = CheckpointAlignment(spec.task)
        if devices is not None:
            result = execute_on_ranks(claim, spec, settings, devices, checkpoint_dir, should_cancel, progress)
        else:
            result = execute_run(
                spec,
                sink,
                checkpoint_dir=checkpoint_dir,
                should_cancel=should_cancel,
                device=settings.worker_device,
                progress=progress,
            )
        sink.close()
        status, reason = result.status, result.reason
        final_step, summary = result.final_step, _finite_summary(result.summary)
        if summary is not None and resumed_from is not None:
            summary["resumed_from_step"] = float(resumed_from)
    except Exception as exc:
        error = traceback.format_exc()
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        log.exception("run %s failed", claim.run_id)
        try:
            sink.close()
        except Exception:
            log.exception("could not flush the metrics of failed run %s", claim.run_id)
    finally:
        heartbeat.stop()
    elapsed = time.monotonic() - started

    if heartbeat.lost.is_set():
        log.warning("run %s was taken over by another worker; leaving it alone", claim.run_id)
        return "lost"
    if status == RunStatus.CANCELLED and SHUTDOWN.is_set() and not heartbeat.cancel.is_set():
        return _requeue_for_shutdown(claim, settings, elapsed)
    if status == RunStatus.CANCELLED and heartbeat.cancel.is_set():
        reason = "cancelled on request"
    if status != RunStatus.SUCCEEDED and not reason:
        reason = status
    with session_scope(settings.database_url) as session:
        finished = runs_crud.finish_run(
            session,
            claim,
            status=status,
            reason=reason if status != RunStatus.SUCCEEDED else None,
            final_step=final_step,
            summary=summary,
            error=error,
            run_seconds=elapsed,
        )
        new_runs = runs_crud.expand_next_stage(session, claim.job_id) if finished else []
    if finished:
        build_rollups_safely(settings.database_url, claim.run_id)
    if new_runs:
        publish_runs(settings, new_runs)
    return status if finished else "lost"


def execute_on_ranks(
    claim: runs_crud.Claim,
    spec: RunSpec,
    settings: Settings,
    devices: list[str],
    checkpoint_dir: Path,
    should_cancel: Callable[[], bool],
    progress: Callable[..., None],
) -> Any:
    """Supervise the run's ranks on ``devices``; rank 0 writes the metrics to the database itself."""
    from worker.distributed.launch import launch_ranks
    from worker.training.runner import RunResult

    on_gpus = all(device.isdigit() for device in devices)
    if spec.device == "cuda" and not on_gpus:
        reason = f"the run asks for CUDA devices and this worker offers CPU ranks ({', '.join(devices)})"
        return RunResult(status=RunStatus.FAILED, reason=reason, final_step=0)
    log.info("run %s trains on %s", claim.run_id, ", ".join(devices))
    return launch_ranks(
        spec,
        checkpoint_dir / "launch",
        checkpoint_dir=checkpoint_dir,
        devices=devices,
        sink="database",
        run_id=claim.run_id,
        should_stop=should_cancel,
        progress=progress,
        env=settings.env(),
    )


def _requeue_for_shutdown(claim: runs_crud.Claim, settings: Settings, elapsed: float) -> str:
    """The worker is stopping: the runner has checkpointed; hand the run back to the queue."""
    with session_scope(settings.database_url) as session:
        requeued = runs_crud.release_run(session, claim, run_seconds=elapsed)
    if not requeued:
        return "lost"
    log.warning("worker stopping: run %s requeued, resumes from its checkpoint", claim.run_id)
    try:
        with session_scope(settings.database_url) as session:
            queue = runs_crud.run_queue(session, claim.run_id) or "gpu"
        publish_runs(settings, [(claim.run_id, queue)])
    except Exception as exc:  # database blip: the reconciler publishes it later
        log.warning("could not publish run %s: %s", claim.run_id, exc)
    return "requeued"
