"""Jobs on two devices through the service, with real Celery workers offering two CPU ranks.

* Over REST to the embedded stack (SQLite + the SQLAlchemy broker): a 2-device job ends with the
  curves and Fisher rows of its 1-device twin (twice the accumulation), rank 0 writing them.
* On PostgreSQL + Redis: a worker SIGKILLed mid-run takes its ranks with it; the next worker resumes
  the run from its checkpoint and every step is stored once. A cancel stops every rank.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.server.test_reliability_faults import assert_each_step_once, wait_run_step
from tests.support.services import tiny_job

TERMINAL = {"succeeded", "failed", "diverged", "cancelled"}


def two_device_job(name: str, devices: int, steps: int = 12, **task: Any) -> dict[str, Any]:
    # Sides that are multiples of 16 (the byte vocabulary padded to 320): CPU BLAS rounds odd sides
    # by a matrix's place in a batch (tests/worker/test_distributed_runs.py).
    body = tiny_job(
        name=name, steps=steps, devices_per_run=devices, grad_accum=2 // devices, vocab_size=320, **task
    )
    body["optimizers"][1]["hyperparameters"]["precondition_frequency"] = 4  # refreshes within 12 steps
    return body


def metric_series(api: Any, job_id: int) -> dict[tuple[str, str, int], float]:
    rows = csv.DictReader(io.StringIO(api.get(f"/jobs/{job_id}/metrics.csv").text))
    wanted = {"train_loss", "val_loss", "grad_norm"}
    return {(r["label"], r["name"], int(r["step"])): float(r["value"]) for r in rows if r["name"] in wanted}


def fisher_rows(api: Any, job_id: int) -> dict[tuple[str, ...], float]:
    rows = csv.DictReader(io.StringIO(api.get(f"/jobs/{job_id}/fisher.csv").text))
    return {
        (r["label"], r["step"], r["layer"], r["method"], r["metric"]): float(r["value"])
        for r in rows
        if r["value"] not in ("", "nan")
    }


def rank_pids(settings: Any, run_id: int) -> list[int]:
    folder = settings.checkpoint_root / str(run_id) / "launch"
    return [int(path.read_text()) for path in sorted(folder.glob("rank-*.pid"))]


def wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.1)
    assert not alive, f"rank processes still alive: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has exited


def test_two_device_job_over_rest_matches_its_one_device_twin(
    sqlite_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    api = api_factory(sqlite_settings)
    worker = worker_factory(sqlite_settings, name="ranks", cpus=2)
    deadline = time.monotonic() + 60
    while True:  # a 2-device job is accepted once the worker has registered its ranks
        r = api.post("/jobs", json=two_device_job("pair", 2))
        if r.status_code == 201 or time.monotonic() > deadline:
            break
        assert r.status_code == 422 and "devices_per_run" in r.text, r.text
        time.sleep(0.5)
    assert r.status_code == 201, r.text
    pair_id = r.json()["id"]
    r = api.post("/jobs", json=two_device_job("single", 1))
    assert r.status_code == 201, r.text
    single_id = r.json()["id"]
    for job_id in (pair_id, single_id):
        job = api.wait_job(job_id, TERMINAL, timeout=300)
        assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    pair = api.get(f"/jobs/{pair_id}").json()
    assert [run["device"] for run in pair["runs"]] == ["cpu×2", "cpu×2"]
    assert [run["queue"] for run in pair["runs"]] == ["cpu-x2", "cpu-x2"]
    one, two = metric_series(api, single_id), metric_series(api, pair_id)
    assert one.keys() == two.keys() and len(one) >= 2 * 12
    worst = max(abs(one[k] - two[k]) / abs(one[k]) for k in one)
    assert worst <= 1e-5, worst
    fisher_one, fisher_two = fisher_rows(api, single_id), fisher_rows(api, pair_id)
    assert fisher_one.keys() == fisher_two.keys() and fisher_two
    assert any(key[3] == "own" for key in fisher_two)  # DyKAF's own factors, read on rank 0
    for key, value in fisher_one.items():
        assert fisher_two[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key


@pytest.mark.timeout(600)
def test_killed_worker_takes_its_ranks_and_the_run_resumes_once(
    pg_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    steps = 200
    settings = pg_settings.with_(reconcile=True, stale_after_s=3.0, max_devices_per_run=2)
    api = api_factory(settings)
    body = two_device_job("killed", 2, steps=steps, checkpoint_every=10, eval_every=1000, fisher_every=0)
    body["optimizers"] = body["optimizers"][1:]  # DyKAF, sharded
    job_id = api.post("/jobs", json=body).json()["id"]
    first = worker_factory(settings, name="first", cpus=2)
    run = wait_run_step(api, job_id, 25, timeout=180)
    pids = rank_pids(settings, run["id"])
    assert len(pids) == 2
    first.kill()
    wait_gone(pids)  # nothing of the dead worker trains on
    worker_factory(settings, name="second", cpus=2)
    job = api.wait_job(job_id, TERMINAL, timeout=400)
    (run,) = job["runs"]
    assert run["status"] == "succeeded" and run["step"] == steps, run
    assert run["attempt"] == 2 and run["summary"]["resumed_from_step"] >= 20
    assert_each_step_once(api, job, steps)


def test_cancel_stops_every_rank(pg_settings: Any, api_factory: Any, worker_factory: Any) -> None:
    settings = pg_settings.with_(max_devices_per_run=2)
    api = api_factory(settings)
    body = two_device_job("cancelled", 2, steps=5000, eval_every=1000, fisher_every=0)
    body["optimizers"] = body["optimizers"][:1]
    job_id = api.post("/jobs", json=body).json()["id"]
    worker_factory(settings, name="ranks", cpus=2)
    run = wait_run_step(api, job_id, 5, timeout=180)
    pids = rank_pids(settings, run["id"])
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = api.wait_job(job_id, TERMINAL, timeout=120)
    (run,) = job["runs"]
    assert run["status"] == "cancelled" and run["reason"] == "cancelled on request", run
    assert 5 <= run["step"] < 5000
    wait_gone(pids)
