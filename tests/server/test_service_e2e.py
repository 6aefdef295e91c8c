"""End to end with real components: the API (TestClient over the real app), real ``celery worker``
subprocesses, and either PostgreSQL + Redis (cluster mode) or SQLite + the SQLAlchemy broker
(embedded mode); ``any_settings`` runs each test on both.

Covered: a job runs to ``succeeded`` with every metric and Fisher row stored once and exported in
the CSVs; a worker killed with SIGKILL mid-run is replaced and the run resumes from its checkpoint
with no gaps and no duplicates; a running job is cancelled within seconds and keeps its data.
"""

from __future__ import annotations

import csv
import io
import socket
import time
from collections import Counter
from typing import Any

from sqlalchemy import func, select

from server.crud import workers as workers_crud
from server.db.models import FisherValue, MetricPoint, MetricRollup, Run, Worker
from server.db.session import session_scope
from tests.support.services import tiny_job
from worker.training.measure import METRIC_NAMES

STEPS = 12
STEPS_LONG = 600
# Metrics the runner logs at every step (log_every=1); val_loss/val_ppl come every eval_every=6.
PER_STEP = set(METRIC_NAMES) - {"val_loss", "val_ppl"}


def check_complete(api: Any, job: dict[str, Any], steps: int) -> list[dict[str, str]]:
    """Every run has every per-step metric at exactly steps 1..N and val_loss at the eval steps;
    the CSV holds exactly the DB rows. Returns the CSV rows."""
    job_id = job["id"]
    text = api.get(f"/jobs/{job_id}/metrics.csv").text
    rows = list(csv.DictReader(io.StringIO(text)))
    keys = Counter((int(r["run_id"]), r["name"], int(r["step"])) for r in rows)
    assert max(keys.values()) == 1, "duplicate points in the CSV"
    run_ids = [run["id"] for run in job["runs"]]
    for run_id in run_ids:
        for name in PER_STEP:
            got = sorted(step for (rid, n, step) in keys if rid == run_id and n == name and step > 0)
            assert got == list(range(1, steps + 1)), (run_id, name, got)
        evals = sorted(step for (rid, n, step) in keys if rid == run_id and n == "val_loss")
        assert evals == [0, *range(6, steps + 1, 6)], (run_id, evals)
    # rows = runs x steps x per-step metrics + eval rows (val_loss, val_ppl) + step-0 extras
    n_evals = 1 + steps // 6
    assert len(rows) == len(run_ids) * (steps * len(PER_STEP) + 2 * n_evals + 2)
    with session_scope(api.settings.database_url) as session:
        in_db = session.scalar(
            select(func.count())
            .select_from(MetricPoint)
            .join(Run, Run.id == MetricPoint.run_id)
            .where(Run.job_id == job_id)
        )
    assert in_db == len(rows)
    return rows


def check_fisher(api: Any, job: dict[str, Any], steps: int) -> None:
    fisher = list(csv.DictReader(io.StringIO(api.get(f"/jobs/{job['id']}/fisher.csv").text)))
    assert fisher, "no Fisher rows"
    for run in job["runs"]:
        got = {int(r["step"]) for r in fisher if int(r["run_id"]) == run["id"]}
        assert got == set(range(4, steps + 1, 4)), (run["label"], got)
    keys = Counter((r["run_id"], r["step"], r["layer"], r["method"], r["metric"]) for r in fisher)
    assert max(keys.values()) == 1
    with session_scope(api.settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(FisherValue)) == len(fisher)


def test_job_runs_to_success(any_settings: Any, api_factory: Any, worker_factory: Any) -> None:
    settings = any_settings
    api = api_factory(settings)
    # Started as `dykaf-lab worker --queue gpu,cpu --cpus 2` does: it also enters the workers registry.
    worker = worker_factory(settings, name="ranks", cpus=2)
    r = api.post("/jobs", json=tiny_job(seeds=(0, 1)))
    assert r.status_code == 201, r.text
    job = api.wait_job(r.json()["id"], {"succeeded", "failed", "diverged", "cancelled"}, timeout=180)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    assert job["progress"]["fraction"] == 1.0 and job["finished_at"]
    for run in job["runs"]:
        assert run["status"] == "succeeded" and run["reason"] is None and run["attempt"] == 1
        assert run["step"] == STEPS and run["device"] == "cpu" and run["run_seconds"] > 0
        assert run["summary"]["final_step"] == STEPS and run["summary"]["final_val_loss"] > 0
    check_complete(api, job, STEPS)
    check_fisher(api, job, STEPS)
    with session_scope(settings.database_url) as session:  # each worker rolled up its ended run
        assert set(session.scalars(select(Run.rollup_built)).all()) == {True}
        assert session.scalar(select(func.count()).select_from(MetricRollup)) > 0
    runs = list(csv.DictReader(io.StringIO(api.get(f"/jobs/{job['id']}/runs.csv").text)))
    assert [s["status"] for s in runs] == ["succeeded"] * 4 and all(
        float(s["final_val_loss"]) > 0 for s in runs
    )
    summary = list(csv.DictReader(io.StringIO(api.get(f"/jobs/{job['id']}/summary.csv").text)))
    assert [(s["label"], s["succeeded"], s["partial"]) for s in summary] == [
        ("adamw", "2", "0"),
        ("dykaf", "2", "0"),
    ]
    assert all(float(s["final_val_loss_mean"]) > 0 for s in summary)
    metrics = api.get(f"/jobs/{job['id']}/metrics", params={"name": "train_loss"}).json()
    assert len(metrics["series"]) == 4 and [a["label"] for a in metrics["aggregates"]] == ["adamw", "dykaf"]
    assert all(n == 2 for a in metrics["aggregates"] for n in a["n"])
    check_registered(settings, worker)


def check_registered(settings: Any, worker: Any) -> None:
    """The worker registered under its node name, offering its 2 CPU ranks: a 2-device CPU job is
    accepted from now on (``server.api.routes.jobs.check_devices``)."""
    deadline = time.monotonic() + 60
    while True:
        with session_scope(settings.database_url) as session:
            rows = session.scalars(select(Worker)).all()
            offer = workers_crud.largest_offer(session, "cpu", settings.worker_seen_s)
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(r.name, r.host, r.kind, r.devices) for r in rows] == [
        (f"ranks@{socket.gethostname()}", socket.gethostname(), "cpu", 2)
    ], worker.log()[-3000:]
    assert offer == 2 and rows[0].last_seen >= rows[0].started_at
    assert "registered as ranks@" in worker.log()


def _wait_step(api: Any, job_id: int, run_index: int, min_step: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/jobs/{job_id}").json()
        run = job["runs"][run_index]
        if run["status"] == "running" and run["step"] >= min_step:
            return job
        assert run["status"] in ("queued", "running"), run
        time.sleep(0.05)
    raise AssertionError(f"run {run_index} of job {job_id} never reached step {min_step}")


def test_killed_worker_is_replaced_and_the_run_resumes(
    any_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    settings = any_settings.with_(reconcile=True)
    api = api_factory(settings)
    body = tiny_job(steps=STEPS_LONG, seeds=(0,), checkpoint_every=10, eval_every=300, fisher_every=100)
    body["optimizers"] = body["optimizers"][:1]
    victim = worker_factory(settings, name="victim")
    job_id = api.post("/jobs", json=body).json()["id"]
    _wait_step(api, job_id, 0, 25)  # past two checkpoints
    victim.kill()
    with session_scope(settings.database_url) as session:
        run = session.scalars(select(Run).where(Run.job_id == job_id)).one()
        killed_at = run.step
    assert run.status == "running" and run.attempt == 1 and killed_at < STEPS_LONG
    # The reconciler inside the replacement worker notices the stale heartbeat and requeues.
    worker_factory(settings, name="rescuer")
    job = api.wait_job(job_id, {"succeeded", "failed", "diverged", "cancelled"}, timeout=240)
    assert job["status"] == "succeeded", job
    (run,) = job["runs"]
    assert run["attempt"] == 2 and run["step"] == STEPS_LONG
    # resumed from a checkpoint written before the kill, not from scratch
    resumed = run["summary"]["resumed_from_step"]
    # (killed_at is the last step the heartbeat reported, so it may lag the checkpoint a little)
    assert resumed % 10 == 0 and max(20, killed_at - 10) <= resumed < STEPS_LONG, (resumed, killed_at)
    rows = list(csv.DictReader(io.StringIO(api.get(f"/jobs/{job_id}/metrics.csv").text)))
    train = sorted(int(r["step"]) for r in rows if r["name"] == "train_loss")
    assert train == list(range(1, STEPS_LONG + 1)), "gaps or duplicates after the resume"
    keys = Counter((r["name"], r["step"]) for r in rows)
    assert max(keys.values()) == 1
    fisher = {int(r["step"]) for r in csv.DictReader(io.StringIO(api.get(f"/jobs/{job_id}/fisher.csv").text))}
    assert fisher == set(range(100, STEPS_LONG + 1, 100))


def test_cancel_a_running_job(any_settings: Any, api_factory: Any, worker_factory: Any) -> None:
    settings = any_settings
    api = api_factory(settings)
    worker_factory(settings)
    body = tiny_job(steps=5000, seeds=(0,), eval_every=1000, fisher_every=0, checkpoint_every=0)
    job_id = api.post("/jobs", json=body).json()["id"]
    _wait_step(api, job_id, 0, 10)
    t0 = time.monotonic()
    r = api.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 200
    statuses = {run["status"] for run in r.json()["runs"]}
    assert statuses == {"running", "cancelled"}  # run 0 running (flagged), run 1 never started
    job = api.wait_job(job_id, {"cancelled"}, timeout=30)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"cancel took {elapsed:.1f}s"
    first, second = job["runs"]
    assert first["status"] == "cancelled" and first["reason"] == "cancelled on request"
    assert 10 <= first["step"] < 5000
    assert second["status"] == "cancelled" and second["reason"] == "cancelled before it started"
    assert job["reason"].startswith("cancelled on request")
    rows = list(csv.DictReader(io.StringIO(api.get(f"/jobs/{job_id}/metrics.csv").text)))
    train = sorted(
        int(r["step"]) for r in rows if r["name"] == "train_loss" and int(r["run_id"]) == first["id"]
    )
    assert train == list(range(1, first["step"] + 1))  # the data up to the stop is kept, complete
