"""Service settings: one pydantic-settings class whose ``DYKAF_*`` variables derive from its fields.

Every field ``name`` is read from ``DYKAF_<NAME>`` by ``Settings.from_env()`` (the API, the Celery
worker and the CLI build it that way) and written back by ``Settings.env()`` for child processes,
so the field list is the only list. Building ``Settings(...)`` directly reads no environment at all:
tests build it with explicit values and see no hidden global state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "DYKAF_"
# Most devices one worker offers or one run asks for (the job contract's own cap is the same).
MAX_DEVICES = 64


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


class Settings(BaseSettings):
    """Everything the service processes need to agree on.

    ``database_url`` and ``broker_url`` default to the embedded mode: SQLite files under
    ``data_dir`` (the broker is kombu's SQLAlchemy transport on its own SQLite file so that the
    broker's polling never contends with the metric writes on the main database).
    """

    # Empty variables mean "the default" (docker-compose passes every variable, most of them empty).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid"
    )

    data_dir: Path = Path(".lab")
    database_url: str = ""
    broker_url: str = ""
    # Prefix of every Redis key the broker uses, so several deployments (or test sessions) can
    # share one Redis without consuming each other's tasks.
    broker_key_prefix: str = ""
    # Local files a job spec names (corpus files, model directories) must lie under one of these
    # directories (``os.pathsep``-separated in the environment); empty: the working directory and
    # ``cache_dir``. See ``server.jobs.paths``.
    data_roots: Annotated[tuple[Path, ...], NoDecode] = ()
    # Writable cache (BPE tokenizers, Hugging Face dataset caches); None: ``~/.cache/dykaf-lab``
    # (see ``cache_root``), left unset so that a child process keeps its own environment's choice.
    cache_dir: Path | None = None
    # Input limits: a job larger than this is rejected with 4xx before anything is written (the
    # schema's own caps, e.g. ``server.jobs.spec.MAX_STEPS``, apply as well).
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
    # The devices a worker process offers (set by ``dykaf-lab worker --gpus/--gpu/--cpus``): the
    # physical GPU indices it owns, comma-separated (CUDA_VISIBLE_DEVICES is the same list), else
    # this many CPU ranks (Gloo processes). Runs needing N devices take N of them (worker.devices).
    worker_gpus: str | None = None
    worker_cpu_ranks: Annotated[int, Field(ge=1, le=MAX_DEVICES)] = 1
    # Submissions of runs on N > 1 devices are refused when no worker offers N: the limit is this
    # value when set (an operator who knows better than the registry), else the largest offer of the
    # workers whose registry heartbeat is at most ``worker_seen_s`` old (server.crud.workers).
    max_devices_per_run: Annotated[int | None, Field(ge=1, le=MAX_DEVICES)] = None
    worker_seen_s: Annotated[float, Field(gt=0)] = 3600.0
    # Run the stale-run reconciler inside API and worker processes.
    reconcile: bool = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Explicit values only; the environment is read by ``from_env``."""
        return (init_settings,)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            value = f"sqlite:///{(Path(info.data['data_dir']) / 'lab.db').resolve()}"
        return with_psycopg_driver(value)

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str, info: ValidationInfo) -> str:
        return value or f"sqla+sqlite:///{(Path(info.data['data_dir']) / 'broker.db').resolve()}"

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part for part in value.split(os.pathsep) if part.strip())
        return value

    @field_validator("data_roots")
    @classmethod
    def _expand_roots(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(root.expanduser() for root in value)

    @field_validator("worker_gpus")
    @classmethod
    def _gpu_list(cls, value: str | None) -> str | None:
        """Canonical ``"0,2,5"``: distinct non-negative indices, as CUDA_VISIBLE_DEVICES takes them."""
        if value is None:
            return None
        parts = [part.strip() for part in value.split(",")]
        if not all(part.isdigit() for part in parts) or len(set(map(int, parts))) != len(parts):
            raise ValueError(f"must be distinct GPU indices separated by commas, e.g. 0,2,5; got {value!r}")
        if len(parts) > MAX_DEVICES:
            raise ValueError(f"at most {MAX_DEVICES} GPUs per worker")
        return ",".join(str(int(part)) for part in parts)

    @field_validator("cache_dir")
    @classmethod
    def _expand_cache(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read ``DYKAF_<FIELD>`` for every field; explicit ``overrides`` win (the CLI and tests)."""
        return cls(**{**EnvSettingsSource(cls)(), **overrides})

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """``field → variable`` for every field (documentation and deployment checks use it)."""
        return {name: ENV_PREFIX + name.upper() for name in cls.model_fields}

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated like a new one)."""
        return type(self)(**{**dict(self), **changes})

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_is_redis(self) -> bool:
        """Cluster mode's broker; the embedded one is kombu's SQLAlchemy transport (``sqla+``)."""
        return self.broker_url.startswith(("redis://", "rediss://"))

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """The physical GPU indices this worker owns (``worker_gpus``); empty for a CPU worker."""
        return tuple(int(part) for part in self.worker_gpus.split(",")) if self.worker_gpus else ()

    @property
    def cache_root(self) -> Path:
        """The writable cache directory: ``cache_dir`` or ``~/.cache/dykaf-lab``."""
        return self.cache_dir or Path.home() / ".cache" / "dykaf-lab"

    @property
    def checkpoint_root(self) -> Path:
        return self.data_dir / "checkpoints"

    def env(self) -> dict[str, str]:
        """The variables that make a child process (worker subprocess) see the same settings.

        Unset optional values (``worker_device``, ``cache_dir``, empty ``data_roots``) are left out,
        so the child keeps its own environment's value or the default; paths are absolute, so the
        child's working directory does not matter.
        """
        out: dict[str, str] = {}
        for name, variable in self.env_names().items():
            value = getattr(self, name)
            if value is None or value == ():
                continue
            if isinstance(value, bool):
                out[variable] = "1" if value else "0"
            elif isinstance(value, Path):
                out[variable] = str(value.resolve())
            elif isinstance(value, tuple):
                out[variable] = os.pathsep.join(str(Path(part).resolve()) for part in value)
            else:
                out[variable] = str(value)
        return out
