"""A small in-process cache for expensive reads of *finished* jobs.

Metric data of a job whose runs have all ended never changes again (until the job is deleted), so
a downsampled read can be served from memory; the entry is keyed by the job's ``updated_at`` too,
which makes any later write to the job (e.g. a rerun of a run) a miss. Jobs still running are never
cached. Each API replica has its own cache; correctness does not depend on sharing it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class ReadCache:
    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[tuple[int, Hashable], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, job_id: int, key: Hashable) -> Any | None:
        with self._lock:
            value = self._data.get((job_id, key))
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end((job_id, key))
            self.hits += 1
            return value

    def put(self, job_id: int, key: Hashable, value: Any) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._data[(job_id, key)] = value
            self._data.move_to_end((job_id, key))
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def invalidate(self, job_id: int) -> None:
        with self._lock:
            for key in [k for k in self._data if k[0] == job_id]:
                del self._data[key]
