"""Per-key rate limit on writes: a token bucket per API key.

Each key may make ``rate_per_min`` writes a minute on average, with bursts up to the same number
(the bucket starts full). Over the limit the write is refused with 429 and a ``Retry-After`` header
before any route code runs, so nothing is written or queued. ``rate_per_min <= 0`` disables it.

Where the service runs on Redis (cluster mode: several API processes and replicas), the buckets
live in Redis and are updated by one atomic script on Redis' clock, so the limit holds for the key
across every replica (``RedisWriteRateLimiter``). The embedded mode has one API process and keeps
them in memory (``WriteRateLimiter``); so does a replica while Redis is unreachable (a broker
outage must not turn every write into an error: the limit then holds per process).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from typing import Any

from server.core.config import Settings

log = logging.getLogger(__name__)


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


# KEYS[1] the bucket; ARGV: capacity, tokens per millisecond. Returns the wait in ms ("0" = allowed)
# as a string (Lua numbers would be truncated to integers on the way back).
_TOKEN_BUCKET_LUA = """
local capacity = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local last = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - last) * per_ms)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / per_ms end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / per_ms) + 1000)
return tostring(wait)
"""


class RedisWriteRateLimiter:
    """The same token bucket shared by every API process through Redis (see module docstring)."""

    def __init__(self, rate_per_min: float, redis_url: str, key_prefix: str = "") -> None:
        import redis

        self.rate_per_min = float(rate_per_min)
        self.capacity = max(1.0, self.rate_per_min)
        self.prefix = f"{key_prefix}dykaf:write-rate:"
        self._client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
        self._script: Any = self._client.register_script(_TOKEN_BUCKET_LUA)
        self._fallback = WriteRateLimiter(rate_per_min)

    @property
    def enabled(self) -> bool:
        return self.rate_per_min > 0

    def acquire(self, key: object) -> float:
        """Take one token for ``key`` in Redis: 0.0 when allowed, else seconds until one is."""
        if not self.enabled:
            return 0.0
        try:
            wait_ms = float(
                self._script(keys=[f"{self.prefix}{key}"], args=[self.capacity, self.rate_per_min / 60_000.0])
            )
        except Exception as exc:  # Redis down: limit per process rather than fail the write
            log.warning("write rate limit falls back to this process (Redis unavailable: %s)", exc)
            return self._fallback.acquire(key)
        return wait_ms / 1000.0


def make_write_limiter(settings: Settings) -> WriteRateLimiter | RedisWriteRateLimiter:
    """Shared buckets when the service runs on Redis, in-process ones otherwise."""
    if settings.write_rate_per_min > 0 and settings.broker_is_redis:
        return RedisWriteRateLimiter(
            settings.write_rate_per_min, settings.broker_url, settings.broker_key_prefix or ""
        )
    return WriteRateLimiter(settings.write_rate_per_min)


def retry_after_header(wait_s: float) -> str:
    """Whole seconds to wait, at least 1 (``Retry-After`` takes integers; a client that retried after
    a rounded-down 0 would be refused again)."""
    return str(max(1, math.ceil(wait_s)))
