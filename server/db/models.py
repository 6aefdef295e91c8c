"""ORM models: api_keys, studies, jobs, runs, metrics (tall), fisher rows and the workers registry.

Metrics and Fisher rows have natural composite primary keys (``run_id, name, step`` and
``run_id, step, layer, method, metric``): the key is the uniqueness guarantee that makes a
redelivered or resumed run idempotent (inserts use ``ON CONFLICT DO NOTHING``) and the index that
serves every per-series read, with no surrogate id to maintain on a table of millions of rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from server.db.types import JSONType, UTCDateTime, utcnow
from server.jobs.status import RunStatus

# Deterministic constraint names so that Alembic migrations can drop them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKey(Base):
    """An API key; only ``sha256(token)`` is stored, ``prefix`` lets people tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Study(Base):
    """A study (several scales, equal-budget tuning, speed-up over a baseline): its validated spec.

    Its status and results are derived from its jobs (one per scale, ``Job.study_id``), so nothing
    here can disagree with the runs."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)

    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Job(Base):
    """A submitted comparison: the validated spec and a status derived from its runs."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=RunStatus.QUEUED, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    rerun_of: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    study: Mapped[Study | None] = relationship(back_populates="jobs")
    runs: Mapped[list[Run]] = relationship(
        back_populates="job", order_by="Run.index", cascade="all, delete-orphan", passive_deletes=True
    )


class Run(Base):
    """One (optimizer config × sweep point × seed) training run: the unit a worker claims."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_job_id_index", "job_id", "index", unique=True),
        Index("ix_runs_status_heartbeat_at", "status", "heartbeat_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    index: Mapped[int] = mapped_column(Integer, nullable=False)
    label: Mapped[str] = mapped_column(String(200), nullable=False)
    optimizer: Mapped[str] = mapped_column(String(64), nullable=False)
    seed: Mapped[int] = mapped_column(Integer, nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    queue: Mapped[str] = mapped_column(String(32), nullable=False, default="cpu")
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=RunStatus.QUEUED)
    reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    step: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    task_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Wall-clock seconds spent training across all attempts (excludes time waiting in the queue).
    run_seconds: Mapped[float | None] = mapped_column(Float)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # True once the run's metric rollups exist (built when the run ends; see server.crud.rollups).
    rollup_built: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())

    job: Mapped[Job] = relationship(back_populates="runs")


class MetricPoint(Base):
    """One scalar of one run at one step (tall layout: any metric name, no schema change)."""

    __tablename__ = "metrics"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Nullable because SQLite stores NaN as NULL; readers render NULL as NaN.
    value: Mapped[float | None] = mapped_column(Float(precision=53))
    wall_time: Mapped[float] = mapped_column(Float(precision=53), nullable=False)


class MetricRollup(Base):
    """Pre-bucketed metric series of an ended run at widths 4, 16, 64, … steps (``bucket = step //
    width``): chart reads of long series aggregate a few thousand rollup rows instead of every
    point. Sums and counts (not means) are stored so buckets combine exactly into wider ones."""

    __tablename__ = "metric_rollups"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    width: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_first: Mapped[int] = mapped_column(Integer, nullable=False)
    step_last: Mapped[int] = mapped_column(Integer, nullable=False)
    n: Mapped[int] = mapped_column(Integer, nullable=False)
    n_value: Mapped[int] = mapped_column(Integer, nullable=False)
    sum_value: Mapped[float | None] = mapped_column(Float(precision=53))
    min_value: Mapped[float | None] = mapped_column(Float(precision=53))
    max_value: Mapped[float | None] = mapped_column(Float(precision=53))


class FisherValue(Base):
    """One Fisher-fidelity diagnostic (layer × method × metric) of one run at one step."""

    __tablename__ = "fisher"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[str] = mapped_column(String(200), primary_key=True)
    method: Mapped[str] = mapped_column(String(64), primary_key=True)
    metric: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float | None] = mapped_column(Float(precision=53))


class Worker(Base):
    """A worker process and the devices it offers, so the API can refuse at submission a run on
    more devices than any worker owns (``server.crud.workers``).

    ``last_seen`` is stamped with the database's clock (``server.db.clock``), like run heartbeats,
    so a worker machine whose clock is off is judged by the same time as everyone else.
    """

    __tablename__ = "workers"
    __table_args__ = (CheckConstraint("kind IN ('cuda', 'cpu')", name="kind"),)

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    kind: Mapped[str] = mapped_column(String(8), nullable=False)
    devices: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
