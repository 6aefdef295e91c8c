"""Run lifecycle on real databases: exclusive claims, fenced writes, the batched metric sink and its
retries, checkpoint-aligned flushing, the stale-run reconciler, derived job status, and the second
stage of ``first_seed`` sweeps."""

from __future__ import annotations

import random
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, inspect, select, text, update

from server.crud import jobs as jobs_crud
from server.crud import runs as runs_crud
from server.db import migrate
from server.db.models import Job, MetricPoint, MetricRollup, Run
from server.db.session import get_engine, session_scope
from server.db.types import utcnow
from server.jobs.reconcile import reconcile_once
from server.jobs.spec import JobSpec
from tests.support.services import tiny_job
from worker.execute import CheckpointAlignment, DatabaseSink


@pytest.fixture
def db(any_settings: Any) -> Any:
    migrate.upgrade(any_settings.database_url)
    return any_settings


def make_job(settings: Any, **kwargs: Any) -> Job:
    spec = JobSpec.model_validate(tiny_job(**kwargs))
    with session_scope(settings.database_url) as session:
        job = jobs_crud.create_job(session, spec, auto_queue="cpu")
        job.runs  # noqa: B018 - load before the session closes
    return job


def claim(settings: Any, run_id: int, worker: str = "w", stale_s: float = 30.0) -> runs_crud.Claim | None:
    with session_scope(settings.database_url) as session:
        return runs_crud.claim_run(session, run_id, worker=worker, device="cpu", stale_after_s=stale_s)


def run_row(settings: Any, run_id: int) -> Run:
    with session_scope(settings.database_url) as session:
        return session.get(Run, run_id)


def age_heartbeat(settings: Any, run_id: int, seconds: float) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Run).where(Run.id == run_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


# --- claims ----------------------------------------------------------------------------------------
def test_only_one_of_many_concurrent_claims_wins(db: Any) -> None:
    job = make_job(db)
    run_id = job.runs[0].id
    results: list[Any] = []
    barrier = threading.Barrier(6)

    def contender(i: int) -> None:
        barrier.wait()
        results.append(claim(db, run_id, worker=f"w{i}"))

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(results) == 6 and len(winners) == 1
    row = run_row(db, run_id)
    assert row.status == "running" and row.attempt == 1 and row.heartbeat_at is not None
    with session_scope(db.database_url) as session:
        assert session.get(Job, job.id).status == "running"


def test_redelivery_is_a_noop_until_the_heartbeat_goes_stale(db: Any) -> None:
    run_id = make_job(db).runs[0].id
    first = claim(db, run_id, worker="a")
    assert first is not None and first.attempt == 1
    assert claim(db, run_id, worker="b") is None  # fresh heartbeat: the redelivered task does nothing
    age_heartbeat(db, run_id, 60)
    second = claim(db, run_id, worker="b")
    assert second is not None and second.attempt == 2
    assert run_row(db, run_id).worker == "b"

    # the first owner is fenced out: its heartbeat reports the loss and its finish writes nothing
    with session_scope(db.database_url) as session:
        assert runs_crud.heartbeat(session, run_id, first.attempt, 5) == (False, True)
    with session_scope(db.database_url) as session:
        assert not runs_crud.finish_run(
            session, first, status="failed", reason="stale", final_step=3, summary={}
        )
    assert run_row(db, run_id).status == "running"

    with session_scope(db.database_url) as session:
        assert runs_crud.heartbeat(session, run_id, second.attempt, 7) == (True, False)
        assert runs_crud.finish_run(
            session, second, status="succeeded", reason=None, final_step=12, summary={"final_val_loss": 2.5}
        )
    row = run_row(db, run_id)
    assert (row.status, row.step, row.summary) == ("succeeded", 12, {"final_val_loss": 2.5})
    assert claim(db, run_id) is None  # finished: never claimed again


def test_staleness_is_judged_by_the_database_clock(pg_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose clock runs two minutes late must not look dead to the reconciler, and one
    whose clock runs ahead must not hide a dead run: both sides read PostgreSQL's now()."""
    import server.crud.runs as runs_module
    import server.db.clock as clock_module

    def skew_local_clock(seconds: float) -> None:
        for module in (runs_module, clock_module):
            monkeypatch.setattr(module, "utcnow", lambda: utcnow() + timedelta(seconds=seconds))

    migrate.upgrade(pg_settings.database_url)
    job = make_job(pg_settings)
    run_id = job.runs[0].id
    skew_local_clock(-120)  # the worker's clock is two minutes late
    owned = claim(pg_settings, run_id)
    assert owned is not None
    with session_scope(pg_settings.database_url) as session:
        assert runs_crud.heartbeat(session, run_id, owned.attempt, step=3) == (True, False)
        db_time = session.scalar(select(func.now()))
    beat = run_row(pg_settings, run_id).heartbeat_at
    assert abs((beat - db_time).total_seconds()) < 5, (beat, db_time)
    with session_scope(pg_settings.database_url) as session:
        assert runs_crud.requeue_stale(session, stale_after_s=30.0) == []
    # A run silent for 60 s by the database's clock is requeued even by a checker whose own clock
    # runs two minutes late (it would see the heartbeat as 60 s in the future).
    age_heartbeat(pg_settings, run_id, 60)
    with session_scope(pg_settings.database_url) as session:
        assert runs_crud.requeue_stale(session, stale_after_s=30.0) == [run_id]


def test_cancelled_runs_are_not_claimed(db: Any) -> None:
    job = make_job(db)
    with session_scope(db.database_url) as session:
        assert jobs_crud.request_cancel(session, job.id) is not None
    assert claim(db, job.runs[0].id) is None
    assert run_row(db, job.runs[0].id).status == "cancelled"


def test_derived_job_status() -> None:
    d = jobs_crud.derive_status
    assert d([("queued", None, "a"), ("queued", None, "b")], False) == ("queued", None)
    assert d([("succeeded", None, "a"), ("queued", None, "b")], False)[0] == "running"
    assert d([("succeeded", None, "a"), ("succeeded", None, "b")], False) == ("succeeded", None)
    status, reason = d([("succeeded", None, "a"), ("diverged", "nan at step 7", "b")], False)
    assert status == "diverged" and reason == "1 of 2 runs diverged; b: nan at step 7"
    assert d([("failed", "boom", "a"), ("diverged", "x", "b")], False)[0] == "failed"
    status, reason = d([("cancelled", "x", "a"), ("succeeded", None, "b")], True)
    assert status == "cancelled" and "cancelled on request" in reason


# --- the metric sink ---------------------------------------------------------------------------------
@pytest.fixture
def commits(db: Any) -> Any:
    """Transactions committed on the service engine during the test."""
    engine = get_engine(db.database_url)
    seen: list[int] = []

    def on_commit(conn: Any) -> None:
        seen.append(1)

    event.listen(engine, "commit", on_commit)
    yield seen
    event.remove(engine, "commit", on_commit)


def test_sink_writes_in_batches_and_replays_are_idempotent(db: Any, commits: list[int]) -> None:
    run_id = make_job(db).runs[0].id
    engine = get_engine(db.database_url)
    commits.clear()
    sink = DatabaseSink(engine, run_id, flush_every_points=1000, flush_every_s=3600)
    for step in range(1, 301):
        sink.log_metrics(step, {"train_loss": 1.0 / step, "lr": 0.1, "grad_norm": float(step)}, step * 0.1)
    sink.close()
    assert sink.flushes == 1 and len(commits) == 1  # 900 points, one transaction
    with session_scope(db.database_url) as session:
        assert session.scalar(select(func.count()).select_from(MetricPoint)) == 900

    replay = DatabaseSink(engine, run_id, flush_every_points=10_000, flush_every_s=3600)
    for step in range(250, 351):  # a resumed attempt re-logs 250..300 and continues
        replay.log_metrics(step, {"train_loss": -1.0, "lr": 0.1, "grad_norm": float(step)}, 0.0)
    replay.close()
    with session_scope(db.database_url) as session:
        steps = session.scalars(
            select(MetricPoint.step).where(MetricPoint.name == "train_loss").order_by(MetricPoint.step)
        ).all()
        first_write = session.scalar(
            select(MetricPoint.value).where(MetricPoint.name == "train_loss", MetricPoint.step == 260)
        )
    assert steps == list(range(1, 351))  # no gaps, no duplicates
    assert first_write == pytest.approx(1 / 260)  # ON CONFLICT DO NOTHING: the first write stays


def test_sink_flushes_on_time(db: Any) -> None:
    run_id = make_job(db).runs[0].id
    sink = DatabaseSink(get_engine(db.database_url), run_id, flush_every_points=10**6, flush_every_s=0.2)
    sink.log_metrics(1, {"a": 1.0}, 0.0)
    assert sink.flushes == 0 and sink.pending == 1
    time.sleep(0.25)
    sink.log_metrics(2, {"a": 2.0}, 0.0)
    assert sink.flushes == 1 and sink.pending == 0


def test_sink_retries_while_the_table_is_locked(db: Any) -> None:
    """A real transient fault: another transaction holds the lock the insert needs."""
    run_id = make_job(db).runs[0].id
    if db.is_sqlite:
        impatient = create_engine(db.database_url, connect_args={"timeout": 0.05})
    else:
        impatient = create_engine(db.database_url, connect_args={"options": "-c lock_timeout=50"})
    locker = get_engine(db.database_url).connect()
    if db.is_sqlite:
        locker.exec_driver_sql("BEGIN EXCLUSIVE")
    else:
        locker.execute(text("LOCK TABLE metrics IN ACCESS EXCLUSIVE MODE"))
    release = threading.Timer(0.8, lambda: (locker.rollback(), locker.close()))
    release.start()
    sink = DatabaseSink(impatient, run_id, flush_every_points=10**6, flush_every_s=3600, backoff_s=0.05)
    for step in range(1, 51):
        sink.log_metrics(step, {"train_loss": float(step)}, 0.0)
    sink.flush()
    release.join()
    assert sink.retries >= 1 and sink.pending == 0
    with session_scope(db.database_url) as session:
        assert session.scalar(select(func.count()).select_from(MetricPoint)) == 50
    impatient.dispose()


def _simulate_runner(steps: int, log_every: int, eval_every: int, fisher_every: int, ce: int) -> list[int]:
    """The runner's per-step order (log → fisher → checkpoint); returns the buffered points at each save."""

    class Task:
        pass

    task = Task()
    task.steps, task.checkpoint_every = steps, ce
    task.log_every, task.eval_every, task.fisher_every = log_every, eval_every, fisher_every
    align = CheckpointAlignment(task)
    buffered = 0
    at_save = []
    for step in range(1, steps + 1):
        is_log = step % log_every == 0 or step % eval_every == 0 or step == steps
        for happens in (is_log, fisher_every > 0 and step % fisher_every == 0):
            if happens:
                buffered += 1
                if align.must_flush(step):
                    buffered = 0
        if (ce and step % ce == 0) or step == steps:
            at_save.append(buffered)
    return at_save


def test_no_checkpoint_is_ever_ahead_of_the_stored_metrics() -> None:
    rng = random.Random(1)
    for _ in range(500):
        case = (
            rng.randint(1, 60),
            rng.randint(1, 9),
            rng.randint(1, 20),
            rng.choice([0, 0, 3, 5]),
            rng.choice([0, 1, 4, 7, 10]),
        )
        assert set(_simulate_runner(*case)) <= {0}, case
    # and it does not degenerate into flushing every log call
    task = type(
        "T", (), {"steps": 1000, "checkpoint_every": 100, "log_every": 1, "eval_every": 50, "fisher_every": 0}
    )()
    align = CheckpointAlignment(task)
    assert sum(align.must_flush(s) for s in range(1, 1001)) == 10


# --- reconciler --------------------------------------------------------------------------------------
def _broker_depth(settings: Any) -> int:
    if settings.is_sqlite:
        engine = create_engine(settings.broker_url.removeprefix("sqla+"))
        with engine.connect() as conn:
            if not inspect(conn).has_table("kombu_message"):
                return 0
            depth = conn.execute(text("SELECT count(*) FROM kombu_message WHERE visible")).scalar()
        engine.dispose()
        return int(depth or 0)
    import redis

    client = redis.Redis.from_url(settings.broker_url)
    return sum(client.llen(f"{settings.broker_key_prefix}{q}") for q in ("gpu", "cpu"))


def test_reconciler_requeues_runs_of_dead_workers(db: Any) -> None:
    job = make_job(db)
    dead, cancelled = job.runs[0].id, job.runs[1].id
    assert claim(db, dead) and claim(db, cancelled)
    with session_scope(db.database_url) as session:
        session.execute(update(Run).where(Run.id == cancelled).values(cancel_requested=True))
    assert reconcile_once(db).requeued == []  # heartbeats are fresh: nothing to do
    age_heartbeat(db, dead, 60)
    age_heartbeat(db, cancelled, 60)
    depth = _broker_depth(db)
    report = reconcile_once(db)
    assert report.requeued == [dead] and report.enqueued == [dead]
    row = run_row(db, dead)
    assert row.status == "queued" and row.task_id and row.attempt == 1 and "stale" in row.error
    assert run_row(db, cancelled).status == "cancelled"
    assert _broker_depth(db) == depth + 1
    assert reconcile_once(db).enqueued == []  # requeued once, not on every pass
    again = claim(db, dead)
    assert again is not None and again.attempt == 2


def test_reconciler_backfills_rollups_of_runs_that_ended_without_them(db: Any) -> None:
    job = make_job(db)
    run_id = job.runs[0].id
    c = claim(db, run_id)
    with get_engine(db.database_url).begin() as conn:
        from server.crud.metrics import insert_metrics

        insert_metrics(conn, [(run_id, "train_loss", s, 1.0 / s, 0.0) for s in range(1, 101)])
    with session_scope(db.database_url) as session:
        assert runs_crud.finish_run(session, c, status="succeeded", reason=None, final_step=100, summary={})
    assert reconcile_once(db).rolled_up == []  # just ended: left to its own worker for a minute
    with session_scope(db.database_url) as session:
        session.execute(
            update(Run).where(Run.id == run_id).values(finished_at=utcnow() - timedelta(minutes=5))
        )
    assert reconcile_once(db).rolled_up == [run_id]
    with session_scope(db.database_url) as session:
        rows = session.execute(
            select(MetricRollup.width, func.count(), func.sum(MetricRollup.n))
            .where(MetricRollup.run_id == run_id)
            .group_by(MetricRollup.width)
            .order_by(MetricRollup.width)
        ).all()
    # every level covers all 100 points; bucket counts follow step // width over steps 1..100
    assert [(w, n, total) for w, n, total in rows] == [
        (4, 26, 100),
        (16, 7, 100),
        (64, 2, 100),
        (256, 1, 100),
        (1024, 1, 100),
        (4096, 1, 100),
    ]
    assert reconcile_once(db).rolled_up == []


# --- first_seed sweeps ---------------------------------------------------------------------------------
def test_first_seed_selection_adds_the_second_stage_once(db: Any) -> None:
    body = tiny_job(seeds=(0, 1, 2))
    body["sweep_selection"] = "first_seed"
    body["optimizers"][0]["sweep"] = {"lr": [0.001, 0.01]}
    spec = JobSpec.model_validate(body)
    with session_scope(db.database_url) as session:
        job = jobs_crud.create_job(session, spec, auto_queue="cpu")
        stage_one = [(r.id, r.label) for r in job.runs]
    assert [label for _, label in stage_one] == ["adamw[lr=0.001]", "adamw[lr=0.01]", "dykaf"]
    losses = {"adamw[lr=0.001]": 3.0, "adamw[lr=0.01]": 2.0, "dykaf": 2.5}
    created: list[tuple[int, str]] = []
    for run_id, label in stage_one:
        c = claim(db, run_id)
        with session_scope(db.database_url) as session:
            runs_crud.finish_run(
                session,
                c,
                status="succeeded",
                reason=None,
                final_step=12,
                summary={"final_val_loss": losses[label]},
            )
            created += runs_crud.expand_next_stage(session, job.id)
    with session_scope(db.database_url) as session:
        runs = session.scalars(select(Run).where(Run.job_id == job.id).order_by(Run.index)).all()
        status = session.get(Job, job.id).status
        assert runs_crud.expand_next_stage(session, job.id) == []  # only once
    assert [(r.label, r.seed) for r in runs[3:]] == [
        ("adamw[lr=0.01]", 1),
        ("adamw[lr=0.01]", 2),
        ("dykaf", 1),
        ("dykaf", 2),
    ]
    assert [rid for rid, _ in created] == [r.id for r in runs[3:]]
    assert status == "running"
