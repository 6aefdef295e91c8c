"""Response models of the REST API (requests use ``server.jobs.spec.JobSpec`` directly)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class Progress(BaseModel):
    fraction: float = Field(
        ..., description="steps done / steps planned over all runs (ended runs count as done)"
    )
    steps_done: int
    steps_total: int
    runs: dict[str, int] = Field(..., description="number of runs per status")


class RunOut(BaseModel):
    id: int
    index: int
    label: str
    optimizer: str
    seed: int
    status: str
    reason: str | None
    step: int
    total_steps: int
    attempt: int
    worker: str | None
    device: str | None
    queue: str
    cancel_requested: bool
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    run_seconds: float | None
    hyperparameters: dict[str, Any]
    sweep_point: dict[str, Any]
    summary: dict[str, Any] | None


class JobSummaryOut(BaseModel):
    id: int
    name: str
    status: str
    reason: str | None
    cancel_requested: bool
    rerun_of: int | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    progress: Progress


class JobOut(JobSummaryOut):
    spec: dict[str, Any]
    runs: list[RunOut]
    links: dict[str, str]
    warnings: list[str] = Field(default_factory=list)


class JobPage(BaseModel):
    items: list[JobSummaryOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")


class SeriesOut(BaseModel):
    run_id: int
    label: str
    seed: int
    name: str
    step: list[int]
    value: list[float | None] = Field(
        ..., description="mean of the bucket (the point itself when unbucketed)"
    )
    min: list[float | None]
    max: list[float | None]
    count: list[int]


class AggregateOut(BaseModel):
    label: str
    name: str
    step: list[int]
    mean: list[float | None]
    min: list[float | None]
    max: list[float | None]
    std: list[float | None] = Field(..., description="sample standard deviation across seeds")
    n: list[int] = Field(..., description="number of seeds contributing")


class MetricsOut(BaseModel):
    job_id: int
    names: list[str]
    max_points: int
    bucket_width: int = Field(..., description="steps per bucket; buckets are [k*width, (k+1)*width)")
    source: str = Field(
        ..., description="'raw' points or 'rollup/<width>' (pre-bucketed series of ended runs)"
    )
    series: list[SeriesOut]
    aggregates: list[AggregateOut]


class FisherSeriesOut(BaseModel):
    run_id: int
    label: str
    seed: int
    layer: str
    method: str
    metric: str
    step: list[int]
    value: list[float | None]


class FisherOut(BaseModel):
    job_id: int
    series: list[FisherSeriesOut]
