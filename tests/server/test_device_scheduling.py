"""Scheduling runs on several devices, server side: queue names per run size, the workers registry
(SQLite and PostgreSQL), and the submission check that refuses what no worker offers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from server.crud import jobs as jobs_crud
from server.crud import runs as runs_crud
from server.crud import workers as workers_crud
from server.db.models import Job, Run, Worker
from server.db.session import session_scope
from server.db.types import utcnow
from server.jobs.queues import consumed_queues, sized_queue
from server.jobs.reconcile import reconcile_once
from server.jobs.spec import JobSpec
from tests.support.services import tiny_job
from tests.support.studies import study_body


def job_body(devices: int, device: str = "cpu", **kwargs: Any) -> dict[str, Any]:
    body = tiny_job(devices_per_run=devices, **kwargs)
    body["device"] = device
    return body


def counts(settings: Any) -> tuple[int, int]:
    with session_scope(settings.database_url) as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
        runs = session.scalar(select(func.count()).select_from(Run))
    return int(jobs or 0), int(runs or 0)


def register(settings: Any, name: str, kind: str, devices: int) -> None:
    with session_scope(settings.database_url) as session:
        workers_crud.register_worker(session, name=name, host="box", kind=kind, devices=devices)


def age_worker(settings: Any, name: str, seconds: float) -> None:
    with session_scope(settings.database_url) as session:
        seen = session.scalar(select(Worker.last_seen).where(Worker.name == name))
        session.execute(
            update(Worker).where(Worker.name == name).values(last_seen=seen - timedelta(seconds=seconds))
        )


# --- queue names -----------------------------------------------------------------------------------
def test_queue_per_device_family_and_run_size() -> None:
    q = jobs_crud.queue_for
    assert [q("cpu"), q("cuda"), q("auto"), q("auto", "cpu")] == ["cpu", "gpu", "gpu", "cpu"]
    assert [q("cpu", devices=1), q("cuda", devices=4), q("auto", "cpu", 2)] == ["cpu", "gpu-x4", "cpu-x2"]
    assert q("auto", "gpu", 8) == "gpu-x8"
    with pytest.raises(ValueError, match="devices"):
        sized_queue("gpu", 0)
    # A worker consumes its base queues, then the sized ones up to its device count.
    assert consumed_queues(["gpu", "cpu"], 2) == ["gpu", "cpu", "gpu-x2", "cpu-x2"]
    assert consumed_queues(["gpu"], 4) == ["gpu", "gpu-x2", "gpu-x3", "gpu-x4"]
    assert consumed_queues(["cpu"], 1) == ["cpu"]


def test_runs_keep_their_sized_queue_through_every_republish(any_settings: Any) -> None:
    """Submission stores ``cpu-x2``; the second sweep stage and the reconciler reuse the stored name."""
    settings = any_settings
    body = job_body(2, seeds=(0, 1))
    body["sweep_selection"] = "first_seed"
    body["optimizers"] = [{"name": "adamw", "sweep": {"lr": [0.001, 0.01]}}]
    with session_scope(settings.database_url) as session:
        job = jobs_crud.create_job(session, JobSpec.model_validate(body), auto_queue="gpu")
        job_id, stage_one = job.id, [run.id for run in job.runs]
        assert {run.queue for run in job.runs} == {"cpu-x2"}
    created: list[tuple[int, str]] = []
    for loss, run_id in zip((3.0, 2.0), stage_one, strict=True):
        with session_scope(settings.database_url) as session:
            claim = runs_crud.claim_run(session, run_id, worker="w", device="cpu", stale_after_s=30)
            assert claim is not None
            summary = {"final_val_loss": loss}
            runs_crud.finish_run(
                session, claim, status="succeeded", reason=None, final_step=12, summary=summary
            )
            created += runs_crud.expand_next_stage(session, job_id)
    assert [queue for _, queue in created] == ["cpu-x2"]  # the winner on seed 1
    # A run whose worker died goes back to the same queue.
    (new_id, _) = created[0]
    with session_scope(settings.database_url) as session:
        assert runs_crud.claim_run(session, new_id, worker="w", device="cpu", stale_after_s=30) is not None
        an_hour_ago = utcnow() - timedelta(hours=1)
        session.execute(update(Run).where(Run.id == new_id).values(heartbeat_at=an_hour_ago))
    sent: list[tuple[int, str]] = []

    def capture(_settings: Any, run_id: int, queue: str) -> str:
        sent.append((run_id, queue))
        return f"task-{run_id}"

    report = reconcile_once(settings, enqueue=capture)
    assert report.requeued == [new_id] and (new_id, "cpu-x2") in sent
    with session_scope(settings.database_url) as session:
        assert runs_crud.run_queue(session, new_id) == "cpu-x2"  # what a shutdown requeue publishes to


# --- the workers registry ------------------------------------------------------------------------------
def test_registry_offers_by_kind_and_recency(any_settings: Any) -> None:
    settings = any_settings
    with session_scope(settings.database_url) as session:
        assert workers_crud.largest_offer(session, None, 3600) == 0  # nobody yet
    register(settings, "gpus0-3@a", "cuda", 4)
    register(settings, "gpu0@b", "cuda", 1)
    register(settings, "cpu-1@c", "cpu", 2)
    with session_scope(settings.database_url) as session:
        assert workers_crud.largest_offer(session, "cuda", 3600) == 4
        assert workers_crud.largest_offer(session, "cpu", 3600) == 2
        assert workers_crud.largest_offer(session, None, 3600) == 4
    # A worker not seen within the window does not count; its next beat brings it back.
    age_worker(settings, "gpus0-3@a", 7200)
    with session_scope(settings.database_url) as session:
        assert workers_crud.largest_offer(session, "cuda", 3600) == 1
        assert workers_crud.largest_offer(session, "cuda", 10_000) == 4
        started = session.scalar(select(Worker.started_at).where(Worker.name == "gpus0-3@a"))
        workers_crud.beat(session, name="gpus0-3@a", host="a2", kind="cuda", devices=4)
    with session_scope(settings.database_url) as session:
        assert workers_crud.largest_offer(session, "cuda", 3600) == 4
        row = session.get(Worker, "gpus0-3@a")
        assert row.started_at == started and row.host == "a2" and row.last_seen > started
        # A restart with fewer devices replaces the offer (one row per name).
        workers_crud.register_worker(session, name="gpus0-3@a", host="a", kind="cuda", devices=2)
    with session_scope(settings.database_url) as session:
        assert workers_crud.largest_offer(session, "cuda", 3600) == 2
        assert session.scalar(select(func.count()).select_from(Worker)) == 3
        for kind, devices, field in (("tpu", 1, "kind"), ("cpu", 0, "devices")):
            with pytest.raises(ValueError, match=field):
                workers_crud.register_worker(session, name="x", host="h", kind=kind, devices=devices)


def test_registry_uses_the_database_clock(pg_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose own clock is hours off is seen as fresh: ``last_seen`` is PostgreSQL's now()."""
    import server.db.clock as clock

    real = clock.utcnow
    monkeypatch.setattr(clock, "utcnow", lambda: real() - timedelta(hours=3))
    register(pg_settings, "late@box", "cuda", 8)
    with session_scope(pg_settings.database_url) as session:
        seen = session.scalar(select(Worker.last_seen))
        assert abs((seen - session.scalar(select(func.now()))).total_seconds()) < 5
        assert workers_crud.largest_offer(session, "cuda", 60) == 8


# --- refusing at submission what no worker offers --------------------------------------------------
@pytest.fixture
def api(any_settings: Any, api_factory: Any) -> Any:
    return api_factory(any_settings)


def test_runs_on_more_devices_than_any_worker_offers_are_refused(api: Any) -> None:
    before = counts(api.settings)
    r = api.post("/jobs", json=job_body(2))
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "task", "devices_per_run"] and error["type"] == "devices_unavailable"
    msg = error["msg"]
    assert "task.devices_per_run is 2" in msg and "no worker registered for device cpu" in msg
    assert "dykaf-lab worker --cpus 2" in msg and "DYKAF_MAX_DEVICES_PER_RUN" in msg
    assert counts(api.settings) == before  # nothing created
    # One device needs no worker: it waits in its queue.
    assert api.post("/jobs", json=job_body(1)).status_code == 201

    # A CPU worker offering 2 ranks: 2 devices are accepted, 4 are not (and the message says 2).
    register(api.settings, "cpu-7@box", "cpu", 2)
    r = api.post("/jobs", json=job_body(2))
    assert r.status_code == 201, r.text
    assert {run["queue"] for run in r.json()["runs"]} == {"cpu-x2"}
    r = api.post("/jobs", json=job_body(4))
    assert r.status_code == 422
    msg = r.json()["detail"][0]["msg"]
    assert "task.devices_per_run is 4" in msg and "is 2 devices" in msg and "--cpus 4" in msg
    # The CPU worker offers nothing to a cuda job; "auto" takes any worker.
    r = api.post("/jobs", json=job_body(2, device="cuda"))
    assert r.status_code == 422 and "no worker registered for device cuda" in r.json()["detail"][0]["msg"]
    assert "dykaf-lab worker --gpus 0-1" in r.json()["detail"][0]["msg"]
    assert api.post("/jobs", json=job_body(2, device="auto")).status_code == 201
    register(api.settings, "gpus0-7@node", "cuda", 8)
    r = api.post("/jobs", json=job_body(8, device="cuda"))
    assert r.status_code == 201 and {run["queue"] for run in r.json()["runs"]} == {"gpu-x8"}
    # A worker not seen for longer than DYKAF_WORKER_SEEN_S no longer counts.
    age_worker(api.settings, "gpus0-7@node", 2 * api.settings.worker_seen_s)
    assert api.post("/jobs", json=job_body(8, device="cuda")).status_code == 422


def test_the_operator_limit_replaces_the_registry(sqlite_settings: Any, api_factory: Any) -> None:
    api = api_factory(sqlite_settings.with_(max_devices_per_run=4))
    # No worker registered, yet up to 4 devices are accepted (workers that come and go, e.g. autoscaled).
    r = api.post("/jobs", json=job_body(4, device="cuda"))
    assert r.status_code == 201 and {run["queue"] for run in r.json()["runs"]} == {"gpu-x4"}
    register(api.settings, "gpus0-7@node", "cuda", 8)
    before = counts(api.settings)
    r = api.post("/jobs", json=job_body(8, device="cuda"))
    assert r.status_code == 422
    msg = r.json()["detail"][0]["msg"]
    assert "task.devices_per_run is 8" in msg and "DYKAF_MAX_DEVICES_PER_RUN is 4" in msg
    assert counts(api.settings) == before


def test_reruns_and_studies_are_checked_too(sqlite_settings: Any, api_factory: Any) -> None:
    api = api_factory(sqlite_settings)
    register(api.settings, "cpu-1@box", "cpu", 2)
    job = api.post("/jobs", json=job_body(2)).json()
    with session_scope(api.settings.database_url) as session:  # the worker went away for good
        session.execute(update(Worker).values(last_seen=utcnow() - timedelta(days=2)))
    before = counts(api.settings)
    r = api.post(f"/jobs/{job['id']}/rerun")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["spec", "task", "devices_per_run"]
    body = study_body()
    body["scales"][1]["task"]["devices_per_run"] = 2
    r = api.post("/studies", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "scales", 1, "task", "devices_per_run"]
    assert counts(api.settings) == before
    register(api.settings, "cpu-2@box", "cpu", 2)
    assert api.post(f"/jobs/{job['id']}/rerun").status_code == 201
    assert api.post("/studies", json=body).status_code == 201
