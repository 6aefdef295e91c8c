"""Service settings read from ``DYKAF_*`` environment variables.

A plain frozen dataclass rather than pydantic-settings: the API, the Celery worker and the CLI all
build it the same way (``Settings.from_env()``) and tests build it directly with overrides, so there
is no hidden global state and no extra dependency.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


# Seconds uvicorn keeps an idle keep-alive connection open. Above the idle timeouts of the
# clients and proxies in front of it (httpx and browsers 5-60 s, nginx 75 s): when the server closes
# first, a client can send its next request into a connection being torn down and see a
# connection reset instead of an answer (uvicorn's default is 5 s, the same as httpx's).
HTTP_KEEP_ALIVE_S = 90


def with_psycopg_driver(url: str) -> str:
    """``postgresql://`` and ``postgres://`` URLs (what most hosts hand out) use psycopg 3.

    SQLAlchemy would otherwise pick psycopg2, which the project does not install.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class Settings:
    """Everything the service processes need to agree on.

    ``database_url`` and ``broker_url`` default to the embedded mode: SQLite files under
    ``data_dir`` (the broker is kombu's SQLAlchemy transport on its own SQLite file so that the
    broker's polling never contends with the metric writes on the main database).
    """

    data_dir: Path = field(default_factory=lambda: Path(".lab"))
    database_url: str = ""
    broker_url: str = ""
    # Prefix of every Redis key the broker uses, so several deployments (or test sessions) can
    # share one Redis without consuming each other's tasks.
    broker_key_prefix: str = ""
    # Input limits: a job larger than this is rejected with 4xx before anything is written.
    max_steps: int = 1_000_000
    max_runs_per_job: int = 256
    max_body_bytes: int = 1_048_576
    reads_require_key: bool = False
    # Writes (submit, cancel, rerun, delete) allowed per API key per minute, bursts up to the same
    # number; over it the API answers 429 with Retry-After. 0 disables the limit.
    write_rate_per_min: float = 600.0
    # Liveness of runs: the worker heartbeats every ``heartbeat_s``; a running run whose heartbeat
    # is older than ``stale_after_s`` is considered orphaned (its worker died) and is requeued by
    # the reconciler, which runs every ``reconcile_every_s``.
    heartbeat_s: float = 2.0
    stale_after_s: float = 30.0
    reconcile_every_s: float = 10.0
    # Redis re-delivers unacknowledged tasks after this many seconds; it must exceed the longest
    # run or a healthy long run would be delivered twice (harmless thanks to the claim, but noisy).
    visibility_timeout_s: int = 7 * 24 * 3600
    # Metric sink: flush the buffer every N points or every S seconds, whichever comes first.
    flush_every_points: int = 2000
    flush_every_s: float = 2.0
    # Downsampled metric reads return at most this many buckets per series (client may ask less).
    max_points_per_series: int = 5000
    default_points_per_series: int = 1000
    # Downsampled reads kept in each API process (0 disables the cache): finished jobs' until
    # evicted, running jobs' for ``live_read_ttl_s`` seconds, stretched to 10× the aggregation's
    # cost and refreshed in the background (0: running jobs are never cached).
    read_cache_entries: int = 256
    live_read_ttl_s: float = 1.0
    # Queue of runs whose job says device "auto" (embedded workers consume both queues).
    auto_queue: str = "gpu"
    # Device a worker trains on (None = the job's choice; "cuda" when a GPU worker pins one).
    worker_device: str | None = None
    # Run the stale-run reconciler inside API and worker processes.
    reconcile: bool = True

    def __post_init__(self) -> None:
        data_dir = Path(self.data_dir)
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{(data_dir / 'lab.db').resolve()}")
        object.__setattr__(self, "database_url", with_psycopg_driver(self.database_url))
        if not self.broker_url:
            object.__setattr__(self, "broker_url", f"sqla+sqlite:///{(data_dir / 'broker.db').resolve()}")

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Read ``DYKAF_*`` variables; explicit ``overrides`` win (used by the CLI and tests)."""
        values: dict[str, object] = {
            "data_dir": Path(os.environ.get("DYKAF_DATA_DIR") or ".lab"),
            "database_url": os.environ.get("DYKAF_DATABASE_URL", ""),
            "broker_url": os.environ.get("DYKAF_BROKER_URL", ""),
            "broker_key_prefix": os.environ.get("DYKAF_BROKER_KEY_PREFIX", ""),
            "max_steps": _env_int("DYKAF_MAX_STEPS", cls.max_steps),
            "max_runs_per_job": _env_int("DYKAF_MAX_RUNS_PER_JOB", cls.max_runs_per_job),
            "max_body_bytes": _env_int("DYKAF_MAX_BODY_BYTES", cls.max_body_bytes),
            "reads_require_key": _env_bool("DYKAF_READS_REQUIRE_KEY", cls.reads_require_key),
            "write_rate_per_min": _env_float("DYKAF_WRITE_RATE_PER_MIN", cls.write_rate_per_min),
            "heartbeat_s": _env_float("DYKAF_HEARTBEAT_S", cls.heartbeat_s),
            "stale_after_s": _env_float("DYKAF_STALE_AFTER_S", cls.stale_after_s),
            "reconcile_every_s": _env_float("DYKAF_RECONCILE_EVERY_S", cls.reconcile_every_s),
            "visibility_timeout_s": _env_int("DYKAF_VISIBILITY_TIMEOUT_S", cls.visibility_timeout_s),
            "flush_every_points": _env_int("DYKAF_FLUSH_EVERY_POINTS", cls.flush_every_points),
            "flush_every_s": _env_float("DYKAF_FLUSH_EVERY_S", cls.flush_every_s),
            "max_points_per_series": _env_int("DYKAF_MAX_POINTS_PER_SERIES", cls.max_points_per_series),
            "read_cache_entries": _env_int("DYKAF_READ_CACHE_ENTRIES", cls.read_cache_entries),
            "live_read_ttl_s": _env_float("DYKAF_LIVE_READ_TTL_S", cls.live_read_ttl_s),
            "worker_device": os.environ.get("DYKAF_WORKER_DEVICE") or None,
            "auto_queue": os.environ.get("DYKAF_AUTO_QUEUE") or "gpu",
            "reconcile": _env_bool("DYKAF_RECONCILE", cls.reconcile),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_is_redis(self) -> bool:
        """Cluster mode's broker; the embedded one is kombu's SQLAlchemy transport (``sqla+``)."""
        return self.broker_url.startswith(("redis://", "rediss://"))

    @property
    def checkpoint_root(self) -> Path:
        return self.data_dir / "checkpoints"

    def env(self) -> dict[str, str]:
        """The variables that make a child process (worker subprocess) see the same settings."""
        out = {
            "DYKAF_DATA_DIR": str(self.data_dir.resolve()),
            "DYKAF_DATABASE_URL": self.database_url,
            "DYKAF_BROKER_URL": self.broker_url,
            "DYKAF_BROKER_KEY_PREFIX": self.broker_key_prefix,
            "DYKAF_MAX_STEPS": str(self.max_steps),
            "DYKAF_MAX_RUNS_PER_JOB": str(self.max_runs_per_job),
            "DYKAF_MAX_BODY_BYTES": str(self.max_body_bytes),
            "DYKAF_READS_REQUIRE_KEY": "1" if self.reads_require_key else "0",
            "DYKAF_WRITE_RATE_PER_MIN": str(self.write_rate_per_min),
            "DYKAF_HEARTBEAT_S": str(self.heartbeat_s),
            "DYKAF_STALE_AFTER_S": str(self.stale_after_s),
            "DYKAF_RECONCILE_EVERY_S": str(self.reconcile_every_s),
            "DYKAF_VISIBILITY_TIMEOUT_S": str(self.visibility_timeout_s),
            "DYKAF_FLUSH_EVERY_POINTS": str(self.flush_every_points),
            "DYKAF_FLUSH_EVERY_S": str(self.flush_every_s),
            "DYKAF_RECONCILE": "1" if self.reconcile else "0",
            "DYKAF_AUTO_QUEUE": self.auto_queue,
            "DYKAF_MAX_POINTS_PER_SERIES": str(self.max_points_per_series),
            "DYKAF_READ_CACHE_ENTRIES": str(self.read_cache_entries),
            "DYKAF_LIVE_READ_TTL_S": str(self.live_read_ttl_s),
        }
        if self.worker_device:
            out["DYKAF_WORKER_DEVICE"] = self.worker_device
        return out
