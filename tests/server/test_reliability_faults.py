"""Fault injection with real components: Celery worker subprocesses, PostgreSQL and Redis.

Covered (beyond ``test_service_e2e.py``'s single kill -9 and cancel):

* a run whose loss becomes NaN ends ``diverged`` with its step while its sibling runs succeed;
* an unusable checkpoint directory makes the run ``failed`` with a reason naming the path;
* a worker SIGKILLed twice on the same run: the run finishes once, every step's metrics once;
* a private Redis (AOF, ``appendfsync always`` as in docker-compose) SIGKILLed and restarted with
  jobs queued, and again under a worker busy with a run: no accepted run is lost and none runs
  twice;
* a private PostgreSQL stopped and restarted while a run writes metrics: ``/readyz`` answers 503
  while it is down and recovers, and no metric point is lost or duplicated.

The shared PostgreSQL/Redis servers are never touched: restarts use private instances on free
ports in temporary directories, stopped at teardown.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from server.db.models import MetricPoint, Run
from server.db.session import session_scope
from tests.support.services import FAST, service_unavailable, tiny_job

PG_BIN = Path(os.environ.get("DYKAF_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
TERMINAL = {"succeeded", "failed", "diverged", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric_rows(api: Any, job_id: int) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(api.get(f"/jobs/{job_id}/metrics.csv").text)))


def assert_each_step_once(api: Any, job: dict[str, Any], steps: int) -> None:
    rows = metric_rows(api, job["id"])
    keys = Counter((r["run_id"], r["name"], r["step"]) for r in rows)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1][:5]
    for run in job["runs"]:
        train = sorted(
            int(r["step"]) for r in rows if r["name"] == "train_loss" and int(r["run_id"]) == run["id"]
        )
        assert train == list(range(1, steps + 1)), (
            run["id"],
            "gaps",
            sorted(set(range(1, steps + 1)) - set(train))[:10],
        )
    with session_scope(api.settings.database_url) as session:
        stored = session.scalar(
            select(func.count())
            .select_from(MetricPoint)
            .join(Run, Run.id == MetricPoint.run_id)
            .where(Run.job_id == job["id"])
        )
    assert stored == len(rows)


def wait_run_step(api: Any, job_id: int, min_step: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        (run,) = api.get(f"/jobs/{job_id}").json()["runs"]
        if run["status"] == "running" and run["step"] >= min_step:
            return run
        assert run["status"] in ("queued", "running"), run
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached step {min_step}; last {run}")


# --- (a) NaN -> diverged, siblings succeed ------------------------------------------------------------
def test_nan_run_diverges_with_its_step_and_siblings_succeed(
    sqlite_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    api = api_factory(sqlite_settings)
    body = tiny_job(steps=12, schedule="constant", warmup_steps=0)
    # A real, schema-valid configuration that overflows: Adam with no second-moment memory and a
    # vanishing eps divides by ~0, at lr 10 -> NaN loss within a few steps.
    body["optimizers"].append(
        {"name": "adamw", "label": "exploding", "hyperparameters": {"lr": 10.0, "eps": 1e-30, "beta2": 0.0}}
    )
    worker = worker_factory(sqlite_settings)
    job_id = api.post("/jobs", json=body).json()["id"]
    job = api.wait_job(job_id, TERMINAL, timeout=180)
    by_label = {run["label"]: run for run in job["runs"]}
    bad = by_label["exploding"]
    assert bad["status"] == "diverged", (bad, worker.log()[-2000:])
    assert "non-finite" in bad["reason"] and f"at step {bad['step']}" in bad["reason"], bad
    assert 1 <= bad["step"] < 12 and bad["summary"]["diverged_step"] == bad["step"]
    assert bad["attempt"] == 1  # a divergence is a result, not retried
    for label in ("adamw", "dykaf"):
        assert by_label[label]["status"] == "succeeded" and by_label[label]["step"] == 12, by_label[label]
    # The diverged run's points up to its last step are stored; nothing past it.
    rows = metric_rows(api, job_id)
    steps = {int(r["step"]) for r in rows if int(r["run_id"]) == bad["id"] and r["name"] == "train_loss"}
    assert steps == set(range(1, bad["step"] + 1))
    assert job["status"] in ("diverged", "failed", "succeeded")  # derived; the runs carry the truth


# --- (b) unusable checkpoint directory -> failed with a clear reason ---------------------------------
def test_unusable_checkpoint_directory_fails_the_run_with_the_path(
    sqlite_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    api = api_factory(sqlite_settings)
    body = tiny_job(steps=8)
    body["optimizers"] = body["optimizers"][:1]
    # Root ignores permission bits, so make the checkpoint root a plain file: no directory can be
    # created under it whoever the worker runs as.
    root = sqlite_settings.checkpoint_root
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("not a directory")
    worker = worker_factory(sqlite_settings)
    job_id = api.post("/jobs", json=body).json()["id"]
    job = api.wait_job(job_id, TERMINAL, timeout=120)
    (run,) = job["runs"]
    assert run["status"] == "failed", (run, worker.log()[-2000:])
    assert "checkpoints" in run["reason"], run["reason"]
    assert run["attempt"] == 1


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 KiB tmpfs: any checkpoint write runs out of space (needs permission to mount)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def test_disk_full_fails_the_run_with_a_clear_reason(
    sqlite_settings: Any, api_factory: Any, worker_factory: Any, full_disk: Path
) -> None:
    api = api_factory(sqlite_settings)
    body = tiny_job(steps=8, checkpoint_every=4)
    body["optimizers"] = body["optimizers"][:1]
    root = sqlite_settings.checkpoint_root
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(full_disk, target_is_directory=True)  # checkpoints land on the full disk
    worker = worker_factory(sqlite_settings)
    job_id = api.post("/jobs", json=body).json()["id"]
    job = api.wait_job(job_id, TERMINAL, timeout=120)
    (run,) = job["runs"]
    assert run["status"] == "failed", (run, worker.log()[-2000:])
    assert "no space left on device" in run["reason"] and "checkpoint" in run["reason"], run["reason"]
    assert run["attempt"] == 1
    assert not any(full_disk.rglob("*.tmp"))  # the partial file was removed
    # The metrics up to the failed checkpoint were stored (flushed before the write).
    assert [r for r in metric_rows(api, job_id) if r["name"] == "train_loss"]


# --- (c) two SIGKILLs in a row on the same run -------------------------------------------------------
def test_worker_killed_twice_on_one_run_finishes_once(
    pg_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    steps = 300
    settings = pg_settings.with_(reconcile=True, stale_after_s=3.0)
    api = api_factory(settings)
    body = tiny_job(steps=steps, checkpoint_every=10, eval_every=1000, fisher_every=1000)
    body["optimizers"] = body["optimizers"][:1]
    job_id = api.post("/jobs", json=body).json()["id"]
    first = worker_factory(settings, name="first")
    run = wait_run_step(api, job_id, 25)
    first.kill()
    second = worker_factory(settings, name="second")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the second worker picks it up (attempt 2) and makes progress
        (run,) = api.get(f"/jobs/{job_id}").json()["runs"]
        if run["attempt"] == 2 and run["status"] == "running" and run["step"] >= 45:
            break
        assert run["status"] in ("queued", "running"), run
        time.sleep(0.05)
    else:
        raise AssertionError(f"second attempt never progressed: {run}\n{second.log()[-2000:]}")
    second.kill()
    worker_factory(settings, name="third")
    job = api.wait_job(job_id, TERMINAL, timeout=240)
    (run,) = job["runs"]
    assert run["status"] == "succeeded" and run["step"] == steps, run
    assert run["attempt"] == 3
    assert run["summary"]["resumed_from_step"] >= 40
    assert_each_step_once(api, job, steps)


# --- private servers ---------------------------------------------------------------------------------
class PrivateRedis:
    """A private redis-server; ``persistent=False`` runs it without AOF/RDB, so a restart empties it."""

    def __init__(self, persistent: bool = True) -> None:
        self.persistent = persistent
        if shutil.which("redis-server") is None:
            service_unavailable("redis-server binary not found (needed for the Redis restart test)")
        self.dir = Path(tempfile.mkdtemp(prefix="dykaf-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
            ],
            stdout=open(self.dir / "redis.log", "ab"),  # noqa: SIM115 - lives as long as the server
            stderr=subprocess.STDOUT,
        )
        import redis

        deadline = time.monotonic() + 15
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
            service_unavailable(f"PostgreSQL binaries not found in {PG_BIN} (needed for the restart test)")
        self.dir = Path(tempfile.mkdtemp(prefix="dykaf-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            if shutil.which("runuser") is None:
                service_unavailable(
                    "running as root and runuser is missing: cannot start a private PostgreSQL"
                )
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_user, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "pg.log"),
            "-o",
            opts,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        try:
            subprocess.run(
                [
                    *self.as_user,
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
            )
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        yield server
    finally:
        from server.db.session import dispose_engines

        dispose_engines()
        server.close()


# --- (d) Redis restarted with jobs queued ------------------------------------------------------------
def test_redis_crash_with_jobs_queued_loses_and_duplicates_nothing(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, api_factory: Any, worker_factory: Any
) -> None:
    from server.core.config import Settings

    # No reconciler anywhere: whatever runs after the crash came from Redis' own persistence.
    settings = Settings(data_dir=tmp_path / "lab", database_url=pg_url, broker_url=private_redis.url, **FAST)
    api = api_factory(settings)
    jobs = [api.post("/jobs", json=tiny_job(name=f"q{i}", steps=6)).json() for i in range(3)]
    assert all(not job.get("warnings") for job in jobs), jobs
    private_redis.crash()
    r = api.client.get("/readyz")
    assert r.status_code == 503 and [d["loc"] for d in r.json()["detail"]] == [["broker"]]
    private_redis.start()
    assert api.client.get("/readyz").status_code == 200
    worker_factory(settings, name="after-crash")
    for job in jobs:
        done = api.wait_job(job["id"], TERMINAL, timeout=180)
        assert done["status"] == "succeeded", done
        assert all(run["attempt"] == 1 and run["status"] == "succeeded" for run in done["runs"]), done["runs"]
        assert_each_step_once(api, done, 6)
    # Nothing is left queued to run a second time.
    import redis

    client = redis.Redis.from_url(private_redis.url)
    assert sum(client.llen(key) for key in client.scan_iter() if client.type(key) == b"list") == 0


def test_redis_restart_without_persistence_republishes_every_queued_run_once(
    tmp_path: Path, pg_url: str, api_factory: Any, worker_factory: Any
) -> None:
    """A Redis without persistence comes back empty: the database still holds the accepted runs,
    and the reconciler (the real loop) republishes each once, after two passes agree it is lost."""
    import threading

    import redis

    from server.core.config import Settings
    from server.jobs.reconcile import run_forever

    volatile = PrivateRedis(persistent=False)
    stop = threading.Event()
    try:
        settings = Settings(data_dir=tmp_path / "lab", database_url=pg_url, broker_url=volatile.url, **FAST)
        api = api_factory(settings)
        jobs = [api.post("/jobs", json=tiny_job(name=f"v{i}", steps=6)).json() for i in range(2)]
        n_runs = sum(len(job["runs"]) for job in jobs)
        client = redis.Redis.from_url(volatile.url)

        def queued_messages() -> int:
            return sum(client.llen(key) for key in client.scan_iter() if client.type(key) == b"list")

        assert queued_messages() == n_runs
        volatile.crash()
        volatile.start()
        assert queued_messages() == 0  # the messages are gone; the runs are still "queued"
        reconciler = threading.Thread(
            target=run_forever, args=(settings.with_(reconcile_every_s=0.5), stop), daemon=True
        )
        reconciler.start()
        deadline = time.monotonic() + 30
        while queued_messages() < n_runs:
            assert time.monotonic() < deadline, f"only {queued_messages()} of {n_runs} republished"
            time.sleep(0.2)
        time.sleep(1.5)  # three more passes: messages are held now, nothing is published again
        assert queued_messages() == n_runs
        worker_factory(settings, name="after-volatile-restart")
        for job in jobs:
            done = api.wait_job(job["id"], TERMINAL, timeout=180)
            assert done["status"] == "succeeded", done
            assert all(run["attempt"] == 1 for run in done["runs"]), done["runs"]
            assert_each_step_once(api, done, 6)
        assert queued_messages() == 0
    finally:
        stop.set()
        volatile.close()


def test_api_killed_and_restarted_mid_run_the_job_continues(
    tmp_path: Path, pg_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    """The API is not on the training path: SIGKILL it mid-run, the worker keeps training and
    writing; the restarted API serves the finished job with every step once."""
    import httpx

    from server.db.models import Run
    from server.db.session import session_scope
    from tests.support.browser import ServerProcess

    steps = 300
    reads = api_factory(pg_settings)  # in-process client on the same database, for the checks
    server = ServerProcess(pg_settings, tmp_path / "api.log").start()
    try:
        body = tiny_job(steps=steps, checkpoint_every=100, eval_every=1000, fisher_every=0)
        body["optimizers"] = body["optimizers"][:1]
        r = httpx.post(f"{server.url}/api/v1/jobs", json=body, headers=reads.auth, timeout=30)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        worker_factory(pg_settings, name="api-restart")
        wait_run_step(reads, job_id, 20)
        server.proc.kill()  # type: ignore[union-attr]
        server.proc.wait(timeout=10)  # type: ignore[union-attr]

        def stored_step() -> int:
            with session_scope(pg_settings.database_url) as session:
                return int(session.query(Run.step).filter(Run.job_id == job_id).scalar() or 0)

        while_down = stored_step()
        deadline = time.monotonic() + 60
        while stored_step() < while_down + 20:  # training and writing go on without the API
            assert time.monotonic() < deadline, "the run stalled while the API was down"
            time.sleep(0.1)
        server.stop()
        server.start()
        job = reads.wait_job(job_id, TERMINAL, timeout=240)
        via_restarted = httpx.get(f"{server.url}/api/v1/jobs/{job_id}", timeout=30).json()
        assert via_restarted["status"] == job["status"] == "succeeded", job
        (run,) = job["runs"]
        assert run["attempt"] == 1 and run["step"] == steps
        assert_each_step_once(reads, job, steps)
    finally:
        server.stop()


# --- (e) PostgreSQL restarted while a run writes metrics --------------------------------------------
def test_postgres_restart_mid_run_loses_and_duplicates_no_metric(
    tmp_path: Path,
    private_pg: PrivatePostgres,
    redis_server: str,
    redis_prefix: str,
    api_factory: Any,
    worker_factory: Any,
) -> None:
    from server.core.config import Settings

    steps = 400
    settings = Settings(
        data_dir=tmp_path / "lab",
        database_url=private_pg.url,
        broker_url=redis_server,
        broker_key_prefix=redis_prefix,
        **{**FAST, "stale_after_s": 60.0},
    )
    api = api_factory(settings)
    body = tiny_job(steps=steps, checkpoint_every=50, eval_every=1000, fisher_every=1000)
    body["optimizers"] = body["optimizers"][:1]
    job_id = api.post("/jobs", json=body).json()["id"]
    worker = worker_factory(settings, name="pg-restart")
    wait_run_step(api, job_id, 30)
    private_pg.stop()
    try:
        r = api.client.get("/readyz")
        assert r.status_code == 503, r.text
        assert [d["loc"] for d in r.json()["detail"]] == [["database"]]
        time.sleep(2.0)  # the worker keeps training and buffering meanwhile
    finally:
        private_pg.start()
    deadline = time.monotonic() + 30
    while api.client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "readyz did not recover"
        time.sleep(0.2)
    job = api.wait_job(job_id, TERMINAL, timeout=240)
    (run,) = job["runs"]
    assert run["status"] == "succeeded" and run["step"] == steps, (run, worker.log()[-3000:])
    assert run["attempt"] == 1
    assert_each_step_once(api, job, steps)
    assert "metric flush failed" in worker.log() or "heartbeat for run" in worker.log()


def test_redis_crash_while_a_worker_runs_loses_and_duplicates_nothing(
    tmp_path: Path, pg_url: str, private_redis: PrivateRedis, api_factory: Any, worker_factory: Any
) -> None:
    """The broker dies under a busy worker: the run in progress finishes (once), and the runs still
    queued in Redis are delivered after the restart (once each). No reconciler runs."""
    from server.core.config import Settings

    settings = Settings(data_dir=tmp_path / "lab", database_url=pg_url, broker_url=private_redis.url, **FAST)
    api = api_factory(settings)
    long_body = tiny_job(name="busy", steps=200, eval_every=1000, fisher_every=1000, checkpoint_every=50)
    long_body["optimizers"] = long_body["optimizers"][:1]
    busy = api.post("/jobs", json=long_body).json()
    queued = [api.post("/jobs", json=tiny_job(name=f"q{i}", steps=6)).json() for i in range(2)]
    worker = worker_factory(settings, name="busy")
    wait_run_step(api, busy["id"], 10)
    private_redis.crash()
    time.sleep(1.0)
    private_redis.start()
    for job in [busy, *queued]:
        done = api.wait_job(job["id"], TERMINAL, timeout=180)
        assert done["status"] == "succeeded", (done, worker.log()[-3000:])
        assert all(run["attempt"] == 1 for run in done["runs"]), done["runs"]
        assert_each_step_once(api, done, 200 if job is busy else 6)
    assert "Connection to broker lost" in worker.log()  # the fault really hit the busy worker
