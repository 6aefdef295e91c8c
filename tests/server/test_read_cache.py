"""The API's read cache: finished jobs kept, running jobs kept ``live_read_ttl_s``, misses computed once."""

from __future__ import annotations

import threading
import time
from typing import Any

from server.api.routes.metrics import LIVE_COST_FACTOR, live_ttl
from server.cache import ReadCache
from server.crud import jobs as jobs_crud
from server.crud.metrics import insert_fisher, insert_metrics
from server.db.session import get_engine, session_scope
from server.jobs.spec import JobSpec
from tests.support.services import Api, tiny_job


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_live_entries_expire_and_finished_ones_stay() -> None:
    clock = FakeClock()
    cache = ReadCache(max_entries=4, clock=clock)
    cache.put(1, "live", b"a", ttl=1.0)
    cache.put(2, "done", b"b")
    cache.put(3, "off", b"c", ttl=0.0)  # ttl 0: running jobs never cached
    assert cache.get(1, "live") == b"a" and cache.get(3, "off") is None
    clock.now += 1.0
    assert cache.get(1, "live") is None
    clock.now += 10_000
    assert cache.get(2, "done") == b"b"


def test_concurrent_misses_of_one_key_compute_once() -> None:
    cache = ReadCache()
    computed: list[int] = []
    barrier = threading.Barrier(8)

    def reader() -> None:
        barrier.wait()
        if cache.get(7, "k") is not None:
            return
        with cache.single_flight(7, "k"):
            if cache.get(7, "k") is None:
                time.sleep(0.05)  # an aggregation in progress while the others arrive
                computed.append(1)
                cache.put(7, "k", b"body", ttl=5.0)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert computed == [1]
    assert cache._flights == {}  # no lock left behind


def test_expired_live_entries_are_served_while_one_background_refresh_runs() -> None:
    clock = FakeClock()
    cache = ReadCache(clock=clock)
    cache.put(1, "k", b"old", ttl=1.0)
    clock.now += 2.0
    assert cache.lookup(1, "k") == (b"old", False) and cache.get(1, "k") is None
    release = threading.Event()
    calls: list[int] = []

    def slow_aggregation() -> tuple[bytes, float]:
        calls.append(1)
        release.wait(5)
        return b"new", 1.0

    assert cache.refresh_in_background(1, "k", slow_aggregation)
    assert not cache.refresh_in_background(1, "k", slow_aggregation)  # one refresh at a time
    assert cache.lookup(1, "k") == (b"old", False)  # readers keep getting the old bytes meanwhile
    release.set()
    deadline = time.monotonic() + 5
    while cache.lookup(1, "k") != (b"new", True):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert calls == [1] and cache._flights == {}


def test_a_failed_background_refresh_keeps_the_stale_value_and_can_be_retried() -> None:
    clock = FakeClock()
    cache = ReadCache(clock=clock)
    cache.put(1, "k", b"old", ttl=1.0)
    clock.now += 2.0

    def broken() -> tuple[bytes, float]:
        raise RuntimeError("database gone")

    assert cache.refresh_in_background(1, "k", broken)
    deadline = time.monotonic() + 5
    while cache._flights:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert cache.lookup(1, "k") == (b"old", False)
    assert cache.refresh_in_background(1, "k", lambda: (b"new", 1.0))


def test_live_ttl_stretches_with_the_aggregation_cost() -> None:
    assert live_ttl(1.0, 0.01) == 1.0
    assert live_ttl(1.0, 0.45) == LIVE_COST_FACTOR * 0.45
    assert live_ttl(0.0, 0.45) == 0.0  # disabled stays disabled


def _running_job_with_points(api: Api, steps: range) -> tuple[int, int]:
    settings = api.settings
    spec = JobSpec.model_validate(tiny_job())
    with session_scope(settings.database_url) as session:
        job = jobs_crud.create_job(session, spec, auto_queue="cpu")
        job_id, run_id = job.id, job.runs[0].id
    _write(api, run_id, steps)
    return job_id, run_id


def _write(api: Api, run_id: int, steps: range) -> None:
    with get_engine(api.settings.database_url).begin() as conn:
        insert_metrics(conn, [(run_id, "train_loss", s, 1.0 / s, float(s)) for s in steps])


def _last_step(api: Api, job_id: int) -> int:
    body = api.get(f"/jobs/{job_id}/metrics", params={"view": "runs", "name": "train_loss"}).json()
    return max(max(s["step"]) for s in body["series"])


def test_running_job_reads_are_at_most_ttl_old(any_settings: Any) -> None:
    api = Api(any_settings.with_(live_read_ttl_s=3.0))
    job_id, run_id = _running_job_with_points(api, range(1, 11))
    assert _last_step(api, job_id) == 10
    written = time.monotonic()
    _write(api, run_id, range(11, 21))
    if time.monotonic() - written < 2.0:  # (a very slow machine could outlast the TTL here)
        assert _last_step(api, job_id) == 10  # served from the cache within the TTL
    time.sleep(3.1)
    # Expired: a read gets the old bytes at most once more while one refresh runs in the background,
    # whose result the next reads get.
    deadline = time.monotonic() + 10
    while _last_step(api, job_id) != 20:
        assert time.monotonic() < deadline, "the background refresh never landed"
        time.sleep(0.05)


def test_ttl_zero_never_caches_running_jobs(any_settings: Any) -> None:
    api = Api(any_settings.with_(live_read_ttl_s=0.0))
    job_id, run_id = _running_job_with_points(api, range(1, 11))
    assert _last_step(api, job_id) == 10
    _write(api, run_id, range(11, 21))
    assert _last_step(api, job_id) == 20


def _write_fisher(api: Api, run_id: int, step: int) -> None:
    rows = [
        (run_id, step, "blocks.0.mlp.fc", m, "kron_rel_err", 0.5 + step * 1e-4) for m in ("optimal", "soap")
    ]
    with get_engine(api.settings.database_url).begin() as conn:
        insert_fisher(conn, rows)


def _fisher_steps(api: Api, job_id: int, **params: Any) -> set[int]:
    body = api.get(f"/jobs/{job_id}/fisher", params=params).json()
    return {step for s in body["series"] for step in s["step"]}


def test_running_job_fisher_reads_are_at_most_ttl_old(any_settings: Any) -> None:
    """The dashboard asks for every run's Fisher rows on each refresh; they are cached like metrics."""
    api = Api(any_settings.with_(live_read_ttl_s=3.0))
    job_id, run_id = _running_job_with_points(api, range(1, 3))
    _write_fisher(api, run_id, 250)
    assert _fisher_steps(api, job_id) == {250}
    written = time.monotonic()
    _write_fisher(api, run_id, 500)
    if time.monotonic() - written < 2.0:
        assert _fisher_steps(api, job_id) == {250}  # within the TTL: the cached bytes
    assert _fisher_steps(api, job_id, method="soap") == {250, 500}  # another filter, another key
    time.sleep(3.1)
    deadline = time.monotonic() + 10
    while _fisher_steps(api, job_id) != {250, 500}:
        assert time.monotonic() < deadline, "the background refresh never landed"
        time.sleep(0.05)


def test_finished_job_fisher_reads_are_computed_once(any_settings: Any) -> None:
    api = Api(any_settings)
    job_id, run_id = _running_job_with_points(api, range(1, 3))
    _write_fisher(api, run_id, 250)
    assert api.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    cache: ReadCache = api.app.state.read_cache
    first = api.get(f"/jobs/{job_id}/fisher", params={"metric": "kron_rel_err"})
    hits = cache.hits
    again = api.get(f"/jobs/{job_id}/fisher", params={"metric": "kron_rel_err"})
    assert again.content == first.content and cache.hits == hits + 1
    assert {s["method"] for s in first.json()["series"]} == {"optimal", "soap"}
    missing = api.get(f"/jobs/{job_id + 1000}/fisher")
    assert missing.status_code == 404 and "not found" in missing.json()["detail"][0]["msg"]
