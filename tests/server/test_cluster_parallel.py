"""Cluster mode on one machine: two real Celery worker processes on the real Redis broker and the
real PostgreSQL database run two runs of one job at the same time, each exactly once.

What docker-compose.yml does with one worker container per GPU is done here with two worker
subprocesses (solo pool, concurrency 1, prefetch 1, late acks: the same command line as
``dykaf-lab worker``) consuming the same queue. The job has two runs of about 5 s each on one CPU
thread. The test checks, from the database:

* both runs succeeded, each on its first attempt (``attempt == 1``: never claimed twice, never
  requeued), by two different worker processes (``worker`` = ``hostname:pid`` of each subprocess);
* their ``[started_at, finished_at]`` intervals overlap: the two workers trained at the same time,
  which one worker (one run at a time) cannot do;
* the metrics are complete and free of duplicates (every per-step series has exactly the steps
  1..N once), and the worker logs show one claim per run and no redelivered task.

Skips with the reason when PostgreSQL or Redis is unreachable; with DYKAF_REQUIRE_SERVICES=1 (CI)
that is a failure instead (tests/conftest.py).
"""

from __future__ import annotations

import re
import time
from typing import Any

from sqlalchemy import func, select

from server.db.models import MetricPoint, Run
from server.db.session import session_scope
from tests.support.services import tiny_job

STEPS = 80
# Long enough (about 5 s per run on one idle thread of this CPU, 10-20 s on a busy machine) for the
# runs to overlap by seconds, small enough for a quick test.
TASK = {
    "n_layer": 2,
    "n_head": 2,
    "d_model": 64,
    "context": 64,
    "batch_size": 16,
    "eval_every": 40,
    "fisher_every": 40,
    "checkpoint_every": 40,
}
# One thread per worker: two workers then really share the CPU instead of oversubscribing it.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def wait_ready(workers: list[Any], timeout: float = 90.0) -> None:
    """Until every worker process logged Celery's ``ready.`` (it consumes from the queue)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            assert worker.proc.poll() is None, f"worker exited early:\n{worker.log()[-3000:]}"
        if all(re.search(r"\bready\.", worker.log()) for worker in workers):
            return
        time.sleep(0.2)
    raise AssertionError("workers not ready:\n" + "\n---\n".join(w.log()[-2000:] for w in workers))


def test_two_workers_run_two_runs_of_one_job_at_once(
    pg_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    settings = pg_settings
    assert settings.database_url.startswith("postgresql") and settings.broker_url.startswith("redis://")
    api = api_factory(settings)  # migrates the fresh PostgreSQL database
    workers = [worker_factory(settings, name=f"gpu{i}", **ONE_THREAD) for i in range(2)]
    wait_ready(workers)

    spec = tiny_job(name="parallel", steps=STEPS, seeds=(0, 1), **TASK)
    spec["optimizers"] = [{"name": "adamw", "hyperparameters": {"lr": 0.003}}]
    response = api.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = response.json()
    assert len(job["runs"]) == 2
    job = api.wait_job(job["id"], {"succeeded", "failed", "diverged", "cancelled"}, timeout=240)
    logs = [worker.log() for worker in workers]
    assert job["status"] == "succeeded", (job, *[log[-3000:] for log in logs])

    with session_scope(settings.database_url) as session:
        runs = session.scalars(select(Run).where(Run.job_id == job["id"]).order_by(Run.index)).all()
        rows = [
            (r.id, r.status, r.attempt, r.worker, r.started_at, r.finished_at, r.step, r.queue) for r in runs
        ]
        dupes = session.execute(
            select(MetricPoint.run_id, MetricPoint.name, MetricPoint.step, func.count())
            .join(Run, Run.id == MetricPoint.run_id)
            .where(Run.job_id == job["id"])
            .group_by(MetricPoint.run_id, MetricPoint.name, MetricPoint.step)
            .having(func.count() > 1)
        ).all()
        series = {
            (run_id, name): sorted(steps)
            for run_id, name, steps in session.execute(
                select(MetricPoint.run_id, MetricPoint.name, func.array_agg(MetricPoint.step))
                .join(Run, Run.id == MetricPoint.run_id)
                .where(Run.job_id == job["id"])
                .group_by(MetricPoint.run_id, MetricPoint.name)
            ).all()
        }

    # Each run executed exactly once: first attempt, by its own worker process.
    assert [row[1] for row in rows] == ["succeeded", "succeeded"]
    assert [row[2] for row in rows] == [1, 1], rows
    assert [row[6] for row in rows] == [STEPS, STEPS]
    assert {row[7] for row in rows} == {"cpu"}
    names = [row[3] for row in rows]
    assert len(set(names)) == 2, f"both runs on one worker: {names}"
    pids = {int(name.rsplit(":", 1)[1]) for name in names}
    assert pids == {worker.proc.pid for worker in workers}, (names, [w.proc.pid for w in workers])

    # They ran at the same time: the intervals overlap (by at least a second here).
    (_, _, _, _, start_a, end_a, _, _), (_, _, _, _, start_b, end_b, _, _) = rows
    assert start_a < end_a and start_b < end_b
    overlap = (min(end_a, end_b) - max(start_a, start_b)).total_seconds()
    assert overlap > 1.0, f"runs did not overlap: {rows}"

    # Metrics: no duplicates, and every per-step series complete (steps 1..N exactly once).
    assert dupes == []
    run_ids = [row[0] for row in rows]
    for run_id in run_ids:
        assert series[(run_id, "train_loss")] == list(range(1, STEPS + 1)), run_id
        assert series[(run_id, "lr")] == list(range(1, STEPS + 1)), run_id
        assert series[(run_id, "val_loss")] == [0, *range(40, STEPS + 1, 40)], run_id

    # The logs agree: each run claimed once in total, no task delivered twice, nothing skipped.
    both = "\n".join(logs)
    for run_id in run_ids:
        claims = re.findall(rf"run {run_id} claimed \(attempt (\d+)", both)
        assert claims == ["1"], (run_id, claims)
    assert "not claimable" not in both
    assert all(re.search(r"run \d+ claimed", log) for log in logs), "a worker ran nothing"
