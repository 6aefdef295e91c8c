"""A small in-process cache for expensive downsampled reads.

Metric data of a job whose runs have all ended never changes again (until the job is deleted), so
its reads are kept until evicted; the key includes the job's ``updated_at`` too, which makes any
later write to the job (e.g. a rerun of a run) a miss. Reads of a job still running are kept for
``ttl`` seconds only (``Settings.live_read_ttl_s``, 1 s by default): a live chart polling every few
seconds sees data at most that old, and a hundred dashboards watching one job cost one aggregation
per second instead of a hundred. Concurrent misses of one key are computed once (``single_flight``).
Each API replica has its own cache; correctness does not depend on sharing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

Key = tuple[int, Hashable]

log = logging.getLogger(__name__)


class ReadCache:
    def __init__(self, max_entries: int = 256, clock: Any = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[Key, tuple[Any, float | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._flights: dict[Key, tuple[threading.Lock, int]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, job_id: int, key: Hashable) -> Any | None:
        """The fresh value for ``key``, or None (absent or expired)."""
        value, fresh = self.lookup(job_id, key)
        return value if fresh else None

    def lookup(self, job_id: int, key: Hashable) -> tuple[Any | None, bool]:
        """``(value, fresh)``: an expired entry is still returned (``fresh`` False) so that callers
        can serve it while one of them recomputes (stale-while-revalidate)."""
        with self._lock:
            entry = self._data.get((job_id, key))
            if entry is None:
                self.misses += 1
                return None, False
            self._data.move_to_end((job_id, key))
            fresh = entry[1] is None or entry[1] > self._clock()
            if fresh:
                self.hits += 1
            else:
                self.misses += 1
            return entry[0], fresh

    def put(self, job_id: int, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store ``value``; with ``ttl`` (seconds) it expires, without it only eviction drops it."""
        if self.max_entries <= 0 or (ttl is not None and ttl <= 0):
            return
        expires = None if ttl is None else self._clock() + ttl
        with self._lock:
            self._data[(job_id, key)] = (value, expires)
            self._data.move_to_end((job_id, key))
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    @contextmanager
    def single_flight(self, job_id: int, key: Hashable) -> Iterator[None]:
        """Hold a per-key lock: a thread that missed computes while the others wait, then hit."""
        full = (job_id, key)
        with self._lock:
            lock, users = self._flights.get(full, (threading.Lock(), 0))
            self._flights[full] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            self._leave(full)

    def refresh_in_background(
        self, job_id: int, key: Hashable, compute: Callable[[], tuple[Any, float | None]]
    ) -> bool:
        """Recompute an expired entry on a daemon thread unless one already is; True if started.

        ``compute`` returns ``(value, ttl)``. The caller serves the expired value meanwhile, so no
        reader of a watched live job ever waits for an aggregation after the first one.
        """
        full = (job_id, key)
        with self._lock:
            lock, users = self._flights.get(full, (threading.Lock(), 0))
            if not lock.acquire(blocking=False):
                return False
            self._flights[full] = (lock, users + 1)

        def run() -> None:
            try:
                value, ttl = compute()
                self.put(job_id, key, value, ttl=ttl)
            except Exception:  # the stale value keeps being served; the next reader retries
                log.exception("background refresh of job %s failed", job_id)
            finally:
                lock.release()
                self._leave(full)

        threading.Thread(target=run, name=f"read-refresh-{job_id}", daemon=True).start()
        return True

    def _leave(self, full: Key) -> None:
        with self._lock:
            lock, users = self._flights[full]
            if users <= 1:
                del self._flights[full]
            else:
                self._flights[full] = (lock, users - 1)

    def invalidate(self, job_id: int) -> None:
        with self._lock:
            for key in [k for k in self._data if k[0] == job_id]:
                del self._data[key]
