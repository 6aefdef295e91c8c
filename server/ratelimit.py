"""Per-key rate limit on writes: a small in-memory token bucket per API key.

Each key may make ``rate_per_min`` writes a minute on average, with bursts up to the same number
(the bucket starts full). Over the limit the write is refused with 429 and a ``Retry-After`` header
before any route code runs, so nothing is written or queued. The state lives in the API process:
with several API replicas each enforces the limit on its own (the effective limit is per replica).
``rate_per_min <= 0`` disables the limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict


class WriteRateLimiter:
    """Token buckets keyed by API key id; the least recently used buckets are dropped past
    ``max_keys`` (a dropped key simply starts again with a full bucket)."""

    def __init__(self, rate_per_min: float, max_keys: int = 10_000) -> None:
        self.rate_per_min = float(rate_per_min)
        self.capacity = max(1.0, self.rate_per_min)
        self.max_keys = max_keys
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate_per_min > 0

    def acquire(self, key: object, now: float | None = None) -> float:
        """Take one token for ``key``: 0.0 when allowed, else seconds until one is available."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        per_s = self.rate_per_min / 60.0
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + max(0.0, now - last) * per_s)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / per_s
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
