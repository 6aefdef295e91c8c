"""The API's read cache: finished jobs kept, running jobs kept ``live_read_ttl_s``, misses computed once."""

from __future__ import annotations

import threading
import time
from typing import Any

from server.cache import ReadCache
from server.crud import jobs as jobs_crud
from server.crud.metrics import insert_metrics
from server.db.session import get_engine, session_scope
from tests.conftest import Api, tiny_job
from worker.spec import JobSpec


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
    api = Api(any_settings.with_(live_read_ttl_s=0.6))
    job_id, run_id = _running_job_with_points(api, range(1, 11))
    assert _last_step(api, job_id) == 10
    _write(api, run_id, range(11, 21))
    assert _last_step(api, job_id) == 10  # served from the cache within the TTL
    time.sleep(0.7)
    assert _last_step(api, job_id) == 20


def test_ttl_zero_never_caches_running_jobs(any_settings: Any) -> None:
    api = Api(any_settings.with_(live_read_ttl_s=0.0))
    job_id, run_id = _running_job_with_points(api, range(1, 11))
    assert _last_step(api, job_id) == 10
    _write(api, run_id, range(11, 21))
    assert _last_step(api, job_id) == 20
